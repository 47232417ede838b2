"""Bundle modules/<layer>/*.py into one kernel.py for Kaggle, refusing code that would not survive the bundling.

    python build_kernel.py                  # write kernel.py next to this file
    python build_kernel.py --check          # exit 1 when the committed kernel.py differs from a fresh build
    python build_kernel.py --out PATH --modules DIR

kernel.py is one namespace: a header (how to run it, then a table of contents with the line of each landmark), the
modules' top-level imports, hoisted and merged, then each module minus those imports, layer by layer (LAYERS: the
recipe, the data, the run), in the import graph's order inside a layer with ties broken by PREFERRED: Config, the model,
the losses, the step and its schedule, the loop; then the data; then distribution, checkpoints, metrics, the finish,
the command line and main. A module imports only from its own layer or the ones before it. The rules
(CONVENTIONS.md, "Bundling rules") are checked on the ast; a violation, or a landmark that no longer exists, prints one
line `build_kernel: <file>:<line>: <why>` and exits 1. Standard library only.
"""
import argparse
import ast
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "modules"  # our own imports: `from modules.<layer>.x import a, b`
LAYERS = ("recipe", "data", "run")  # modules/<layer>/x.py, bundled in this order; a layer imports only from itself and
# the layers before it
PREFERRED = (  # tie-break order inside the import graph's: the recipe, then the machinery; unlisted files go after
    "config",  # the settings, the presets and their limits: what a reader of kernel.py sees first
    "layers", "biggan", "models", "losses",  # the model and what D sees
    "utils", "device", "settings", "train",  # the step and what it needs
    "sample", "loop",  # generation, and the loop
    "annotations", "dogs", "demo",  # the data: its robustness, the synthetic demo set
    "budget", "distributed", "checkpoint", "metrics", "report", "submission", "evaluate", "finish", "cli", "setup", "generate",
    "rank", "main")
# The header's table of contents: (what, module, dotted name), listed in kernel.py's order; each must be defined in its
# module (a top-level def, class or assignment, or a method as Class.name), else the build fails.
LANDMARKS = (
    ("every setting, its default (= the Kaggle run) and its unit or choices", "config", "Config"),
    ("the presets: named sets of overrides of those defaults", "config", "PRESETS"),
    ("what each setting may hold (checked before any data is read)", "config", "LIMITS"),
    ("BigGAN G: channels and attention per resolution", "biggan", "BIGGAN_G_ARCH"),
    ("BigGAN D tables: 2nd-place | biggan-pytorch (d_arch)", "biggan", "BIGGAN_D_ARCHS"),
    ("the architectures (arch): biggan, dcgan, dcgan5", "models", "ARCHS"),
    ("the losses (loss): D's and G's for each", "losses", "LOSSES"),
    ("one training step: D, then G, EMA", "train", "Trainer.step"),
    ("training progress: SWA's start, learning rates after roll-backs", "train", "Trainer.set_progress"),
    ("the budget: the finish measured, the plan, when training must stop", "budget", "Pace"),
    ("the training loop: steps, checks, roll-backs, ticks, stop", "loop", "train_loop"),
    ("the finish: images, the verified zip, self-check, pictures", "finish", "finish"),
    ("the command line -> a checked Config", "cli", "parse_config"),
    ("one rank's run: device, trainer, plan, training, the zip", "rank", "run_rank"),
    ("the run: settings, checks and data, the ranks started", "main", "run"),
    ("the entry point and its exit codes", "main", "main"),
)
THIRD_PARTY = ("PIL", "numpy", "scipy", "torch", "torchvision")  # plus sys.stdlib_module_names
MAX_LINE = 120  # a merged `from x import ...` header line longer than this is wrapped in parentheses
HEADER = """\
# kernel.py — Generative Dog Images (Kaggle): trains a GAN on the competition's dog photos and writes images.zip, the
# submission: exactly 10,000 64x64 PNGs, always written before the time budget ends (8h45m, on every GPU it sees).
#
# THE RECIPE: the 2019 2nd place, as the defaults of `class Config` (the kaggle preset; name=value: that field):
#   model     BigGAN-style, conditional on the breed: G 512->64 channels at g_ch=32 (z_dim=120 in 5 chunks, 7.97 M
#             parameters); D the 2nd place's 4 blocks, 64->512 channels at d_ch=32 (4.99 M), projection and an aux
#             classifier; self-attention at 32x32, spectral norm in both
#   loss      loss=rals (relativistic average least squares) plus the aux classifier's, aux_weight=0.1, in D and G
#   Adam      lr_g=2e-4, lr_d=8e-4 (the 2nd place's slides; their code has 4e-4), beta1=0.0, beta2=0.999, constant;
#             batch_size=64 over all GPUs, one D step per G step
#   data      a square window around each box, area-averaged to 64x64; random flips; reals + U(0, 1/128) noise
#   EMA       ema_decay=0.999 per step at batch 64, averaging from ema_start=1000 (a copy of G before); the EMA G ships
#   sampling  truncation=2.0 (|z| entries above it redrawn); G's BatchNorm on each batch's own statistics
#   length    max_steps=50000 G steps, or the training window's end (the budget less the finish) if that comes first
#
# IN A KAGGLE NOTEBOOK: add the competition's data, pick a GPU, paste this whole file into ONE cell, Run All (or
#   Save Version -> Save & Run All). Jupyter's own `-f ...` argument is ignored. To change settings, EITHER run a
#   cell above this one:  import sys; sys.argv = ["kernel.py", "--time-budget", "2h", "--set", "g_ch=48"]
#   OR edit a default in `class Config` (line {config_line}): each field says its unit or choices. CONTENTS: below.
# AS A SCRIPT:
#   python kernel.py --data-dir DIR --out DIR --time-budget 8h45m     # the Kaggle run, anywhere
#   python kernel.py --demo --preset smoke --time-budget 120s         # a 2-minute end-to-end check, CPU is fine
#   torchrun --nproc-per-node 2 kernel.py ...                         # several GPUs through torchrun
#   python kernel.py --generate DIR/checkpoint.pt --out DIR2          # sample a trained G again, no training
#   python kernel.py --help  |  --print-config                        # every flag  |  the settings it would use
# THE SETTINGS PEOPLE CHANGE (flag, or the Config field of the same name):
#   --time-budget 8h45m  wall time of the whole run: 9h, 90m, 600s, 8h30m; the zip is written before it ends
#   --preset kaggle      recipe: kaggle | smoke | dcgan | dcgan5 | dcgan-tricks; "dcgan,smoke" = both, in order
#   --data-dir DIR       folder with all-dogs/ and Annotation/ (default: Kaggle's input, found by itself)
#   --out DIR            where outputs go (default /kaggle/working if it exists, else ./output)
#   --device auto        the GPU: auto (CUDA if present, else CPU) | cpu | cuda | cuda:N
#   --gpus auto          ranks: auto = one process per visible GPU (Kaggle's T4 x2: both) | N; 1 = one process
#   --set NAME=VALUE     any other Config field, e.g. --set batch_size=128 (checked: a bad value stops at once)
# OUTPUTS in --out: images.zip (submit it), report.json (what happened), checkpoint.pt (continue with --resume,
#   or sample with --generate), samples.png, breeds.png, losses.png, nearest.png. A crash, NaN or interrupt during
#   training still ends with a verified zip.
# ON FAILURE: a problem you can fix (bad flag, no data, unusable GPU) stops in seconds with one line naming it;
#   in a notebook the cell fails with that line (no traceback), as a script the exit code is 2.
# MAINTAINERS: this file is GENERATED by build_kernel.py from modules/*.py — edit modules/, then run
#   python build_kernel.py (the tests check kernel.py is fresh). In a notebook, editing this copy is fine."""
CONTENTS_TITLE = "# CONTENTS (line in this file: name, what), the recipe first, then the machinery:"
ORDER_TITLE = "# One namespace: the modules' imports, hoisted and merged, then each module in this order:"
STATEMENT_WORDS = {"Expr": "expression statement (e.g. a call)", "AugAssign": "augmented assignment",
                   "Delete": "del"}  # ast class -> words for messages; others are lower-cased (If -> if)


class BuildError(Exception):
    """A rule violation or unreadable input; str() is `<file>:<line>: <why>`."""

    def __init__(self, file, line, why):
        self.file, self.line, self.why = str(file), line, why
        super().__init__(f"{self.file}:{line}: {why}" if line else f"{self.file}: {why}")


def _shown(path):
    """A path for messages: relative to the working directory when it lies below it."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


class Module:
    """One parsed modules/<layer>/x.py and what the rules found in it."""

    def __init__(self, path, layer):
        self.name, self.layer, self.shown = path.stem, layer, _shown(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise BuildError(self.shown, None, f"cannot read: {exc}") from None
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        self.lines = text.split("\n")  # self.lines[i - 1] is line i, as ast counts them
        try:
            self.tree = ast.parse(text, filename=self.shown)
        except SyntaxError as exc:
            raise BuildError(self.shown, exc.lineno, f"syntax error: {exc.msg}") from None
        self.deps = {}  # module name -> line of its first `from modules.<layer>.<name> import`
        self.dep_layers = {}  # module name -> the layer its import names
        self.own_imports = []  # (module name, imported name, line)
        self.hoisted = []  # top-level stdlib / third-party Import and ImportFrom nodes
        self.defs = {}  # top-level def / class / assignment name -> line
        self.globals = {}  # names made global inside functions -> line (they live in the one namespace too)

    def fail(self, node, why):
        raise BuildError(self.shown, getattr(node, "lineno", None), why)


def _is_main_guard(test):
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq) and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def _target_names(mod, target):
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _target_names(mod, elt)]
    if isinstance(target, ast.Starred):
        return _target_names(mod, target.value)
    mod.fail(target, "top-level assignment to an attribute or item changes another object at import: "
                     "do it inside a function")


def _check_import(mod, node, top_level):
    """Rules 1 and 2 for one import statement anywhere in the file."""
    if isinstance(node, ast.ImportFrom) and node.level:
        mod.fail(node, "relative import: write `from modules.<layer>.x import a, b` (or import the library by name)")
    if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
        mod.fail(node, "star import: name what you import (kernel.py is one namespace)")
    modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
    for name in modules:
        root = name.split(".")[0]
        if root == PACKAGE:
            if isinstance(node, ast.Import):
                mod.fail(node, f"`import {name}`: write `from modules.<layer>.x import a, b`")
            if not top_level:
                mod.fail(node, "import of modules inside a function, class or block: "
                               "move it to the top of the file as `from modules.<layer>.x import a, b`")
            if name.count(".") != 2 or name.split(".")[1] not in LAYERS:
                mod.fail(node, f"`from {name} import ...`: write `from modules.<layer>.x import a, b` (x: a file in "
                               f"modules/<layer>/, <layer> one of {', '.join(LAYERS)})")
            if any(a.asname for a in node.names):
                mod.fail(node, "alias (`as`) in an import from modules: kernel.py is one namespace, use the real name")
            layer, dep = name.split(".")[1:]
            mod.deps.setdefault(dep, node.lineno)
            mod.dep_layers.setdefault(dep, layer)
            mod.own_imports += [(dep, a.name, node.lineno) for a in node.names]
        elif root not in THIRD_PARTY and root not in sys.stdlib_module_names:
            mod.fail(node, f"import of {root!r}: only {', '.join(THIRD_PARTY)} and the standard library are allowed")
    if top_level and modules[0].split(".")[0] != PACKAGE:
        mod.hoisted.append(node)


def _check_module(mod):
    """Rules 1, 2 and 4 on one file; fills deps, own_imports, hoisted, defs and globals."""
    body = mod.tree.body
    top_level = {id(node) for node in body}
    for node in ast.walk(mod.tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            _check_import(mod, node, id(node) in top_level)
        elif isinstance(node, ast.Global):
            for name in node.names:
                mod.globals.setdefault(name, node.lineno)
    import_lines = {n for node in body if isinstance(node, (ast.Import, ast.ImportFrom))
                    for n in range(node.lineno, node.end_lineno + 1)}
    for i, node in enumerate(body):
        names = []
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if import_lines.intersection(range(node.lineno, node.end_lineno + 1)):
            mod.fail(node, "an import shares a line with another statement: put each import on its own line")
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # the docstring, or a string used as a comment
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [n for target in node.targets for n in _target_names(mod, target)]
        elif isinstance(node, ast.AnnAssign):
            names = _target_names(mod, node.target)
        elif isinstance(node, ast.If) and "__name__" in {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}:
            if mod.name != "main":
                mod.fail(node, "`if __name__ == \"__main__\":` outside modules/run/main.py: only main.py may have one")
            if not _is_main_guard(node.test) or node.orelse:
                mod.fail(node, "write the guard exactly as `if __name__ == \"__main__\":`, with no else")
            if i != len(body) - 1:
                mod.fail(node, "the `if __name__ == \"__main__\":` block must be the last statement of main.py")
        else:
            word = STATEMENT_WORDS.get(type(node).__name__, type(node).__name__.lower())
            mod.fail(node, f"top-level {word} runs at import (importing must do nothing): move it into a function"
                           + (" or main.py's __name__ guard" if mod.name == "main" else ""))
        for name in names:
            mod.defs.setdefault(name, node.lineno)


def _order(mods):
    """Topological order of the import graph; ties by layer, then PREFERRED, then unlisted alphabetically; main last.

    A module is pulled forward to just before the earliest module that needs it (directly or not), so an unlisted
    helper of utils comes right before utils, not after everything listed.
    """
    def own(name):
        if name == "main":
            return (len(LAYERS), 0, 0, "")
        layer = LAYERS.index(mods[name].layer)
        return (layer, 0, PREFERRED.index(name), "") if name in PREFERRED else (layer, 1, 0, name)

    users = {name: [m for m in mods if name in mods[m].deps] for name in mods}
    pulled = {}
    for name in mods:
        seen, todo = {name}, [name]  # name and every module that needs it, directly or not
        while todo:
            for user in users[todo.pop()]:
                if user not in seen:
                    seen.add(user)
                    todo.append(user)
        pulled[name] = min(own(n) for n in seen)

    def key(name):
        return pulled[name], own(name)

    remaining, placed = sorted(mods, key=key), []
    while remaining:
        ready = [n for n in remaining if all(d in placed for d in mods[n].deps)]
        if not ready:  # every module left waits on another one left: walk the waits until one repeats
            path = [remaining[0]]
            while True:
                nxt = min((d for d in mods[path[-1]].deps if d not in placed), key=key)
                if nxt in path:
                    cycle = path[path.index(nxt):] + [nxt]
                    first = mods[cycle[0]]
                    raise BuildError(first.shown, first.deps[cycle[1]], "import cycle: " + " -> ".join(cycle))
                path.append(nxt)
        placed.append(ready[0])
        remaining.remove(ready[0])
    return placed


def _bindings(node):
    """(name, what it is bound to) for a hoisted import: `import a.b` binds a; `from a import b as c` binds c to a.b."""
    if isinstance(node, ast.Import):
        return [(a.asname, a.name) if a.asname else (a.name.split(".")[0],) * 2 for a in node.names]
    if node.module == "__future__":
        return []
    return [(a.asname or a.name, f"{node.module}.{a.name}") for a in node.names]


def _check_namespace(ordered):
    """Rule 3: every top-level name means one thing across the bundle (the same import twice is fine)."""
    seen = {}  # name -> (meaning, file, line)
    for mod in ordered:
        found = [(name, ("import", what), node.lineno) for node in mod.hoisted for name, what in _bindings(node)]
        found += [(name, ("def", mod.name), line) for name, line in {**mod.globals, **mod.defs}.items()]
        for name, meaning, line in found:
            old = seen.setdefault(name, (meaning, mod.shown, line))
            if old[0] != meaning:
                def say(m):
                    return f"imported as {m[1]}" if m[0] == "import" else "defined"
                raise BuildError(mod.shown, line, f"{name!r} is {say(meaning)} here but {say(old[0])} in "
                                                  f"{old[1]}:{old[2]} (kernel.py is one namespace: rename one)")


def _packed(prefix, names):
    """`import a, b, c` statements of at most MAX_LINE characters each, names in the given order."""
    lines, line = [], ""
    for name in names:
        if line and len(line) + 2 + len(name) > MAX_LINE:
            lines.append(line)
            line = ""
        line = f"{line}, {name}" if line else prefix + name
    return lines + [line] if line else lines


def _header_imports(ordered):
    """The hoisted imports: `from __future__` first, then `import x [as y]`, then `from x import a, b` per module."""
    future, plain, froms = set(), set(), {}
    for node in (node for mod in ordered for node in mod.hoisted):
        if isinstance(node, ast.Import):
            plain.update((a.name, a.asname or "") for a in node.names)
        else:
            names = {(a.name, a.asname or "") for a in node.names}
            if node.module == "__future__":
                future.update(names)
            else:
                froms.setdefault(node.module, set()).update(names)

    def joined(names):
        return [f"{n} as {a}" if a else n for n, a in sorted(names)]

    def from_line(module, names):
        line = f"from {module} import {', '.join(joined(names))}"
        if len(line) <= MAX_LINE:
            return line
        return f"from {module} import (\n" + "".join(f"    {n},\n" for n in joined(names)) + ")"

    aliased = {a: n for n, a in plain if a}  # `import torch.nn as nn` makes `from torch import nn` redundant
    froms = {module: {(n, a) for n, a in names if aliased.get(a or n) != f"{module}.{n}"}
             for module, names in froms.items()}
    groups = [[from_line("__future__", future)] if future else [],
              _packed("import ", [f"{n} as {a}" if a else n for n, a in sorted(plain)]),  # few lines: Config early
              [from_line(module, names) for module, names in sorted(froms.items()) if names]]
    return "\n\n".join("\n".join(group) for group in groups if group)


def _body(mod):
    """The module's source without its top-level imports; blank runs between statements collapsed to two lines."""
    drop, inside = set(), set()
    for node in mod.tree.body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        lines = range(start, node.end_lineno + 1)
        (drop if isinstance(node, (ast.Import, ast.ImportFrom)) else inside).update(lines)
    out, blanks = [], 0
    for number, line in enumerate(mod.lines, start=1):
        if number in drop:
            continue
        blanks = blanks + 1 if not line.strip() and number not in inside else 0
        if blanks <= 2:  # lines inside a statement (a def, a string) stay verbatim
            out.append(line)
    return "\n".join(out).strip("\n")


def _names(node):
    """The names a top-level (or class-level) statement defines: def, class, assignment."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def _landmark_lines(tree, text, landmarks):
    """{dotted name: its line in kernel.py} for each landmark, found in the bundle's ast inside its module's section."""
    sections, name = {}, None  # module -> [first line, last line] of its part of kernel.py
    for number, line in enumerate(text.split("\n"), start=1):
        if line.startswith("# ==== modules/"):
            name = line.removesuffix(".py ====").split("/")[-1]
            sections[name] = [number, number]
        elif name:
            sections[name][1] = number
    lines = {}
    for what, module, dotted in landmarks:
        shown = f"modules/{module}.py"
        if module not in sections:
            raise BuildError(shown, None, f"no such module for landmark {dotted!r} ({what}): update LANDMARKS in "
                                          "build_kernel.py")
        scope, node = tree.body, None
        for part in dotted.split("."):
            node = next((n for n in scope if part in _names(n)), None)
            scope = node.body if isinstance(node, ast.ClassDef) else []
        first, last = sections[module]
        if node is None or not first <= node.lineno <= last:
            raise BuildError(shown, None, f"landmark {dotted!r} ({what}) is not defined here: update LANDMARKS in "
                                          "build_kernel.py")
        lines[dotted] = node.lineno
    return lines


def _assemble(ordered, landmarks, lines):
    """The text of kernel.py: the header with the table of contents (lines: dotted name -> line, 0 while unknown),
    the hoisted imports, then each module under its banner."""
    header = HEADER.replace("{config_line}", str(lines.get("Config") or "?"))
    listed = sorted(landmarks, key=lambda mark: lines.get(mark[2], 0))  # in the file's order once lines are known
    contents = [CONTENTS_TITLE] + [f"#   {lines.get(name, 0):>5}  {name:<21} {what}" for what, _, name in listed]
    order = textwrap.wrap(" -> ".join(mod.name for mod in ordered), MAX_LINE - 4, break_on_hyphens=False)
    top = [header, "#", *(contents + ["#"] if landmarks else []), ORDER_TITLE] + [f"#   {line}" for line in order]
    parts = ["\n".join(top), _header_imports(ordered)]
    parts += [f"# ==== modules/{mod.layer}/{mod.name}.py ====\n{_body(mod)}".rstrip("\n") for mod in ordered]
    return "\n\n\n".join(part for part in parts if part) + "\n"


def _compiled(text):
    """The ast of kernel.py, after compile() has accepted it; a failure is a BuildError."""
    try:
        compile(text, "kernel.py", "exec", dont_inherit=True)
        return ast.parse(text)
    except SyntaxError as exc:
        raise BuildError("kernel.py", exc.lineno, f"the bundle does not compile: {exc.msg}") from None


def build(modules_dir, *, landmarks=LANDMARKS):
    """The text of kernel.py built from modules_dir/<layer>/*.py; raises BuildError on any rule violation or a
    landmark (LANDMARKS, the header's table of contents) that is not defined in its module."""
    modules_dir = Path(modules_dir)
    if not modules_dir.is_dir():
        raise BuildError(_shown(modules_dir), None, "no such directory")
    mods = {}
    for folder in [modules_dir] + [modules_dir / layer for layer in LAYERS]:
        for path in sorted(folder.glob("*.py")):
            if path.name == "__init__.py":
                init = Module(path, None)
                body = init.tree.body
                for node in body[1:] if ast.get_docstring(init.tree, clean=False) is not None else body:
                    init.fail(node, "an __init__.py in modules/ must be empty or a docstring only")
                continue
            if folder == modules_dir:
                raise BuildError(_shown(path), None, f"a module lives in a layer's folder: modules/<layer>/"
                                                     f"{path.name}, <layer> one of {', '.join(LAYERS)}")
            if not path.stem.isidentifier():
                raise BuildError(_shown(path), None, "a module's file name must be a Python identifier")
            if path.stem in mods:
                raise BuildError(_shown(path), None, f"two modules named {path.stem!r} (the other: "
                                                     f"{mods[path.stem].shown}): kernel.py names them by file name")
            mods[path.stem] = Module(path, folder.name)
    for folder in sorted(p for p in modules_dir.iterdir() if p.is_dir() and p.name not in LAYERS):
        if any(folder.rglob("*.py")):
            raise BuildError(_shown(folder), None, f"not a layer: modules/ holds only {', '.join(LAYERS)}")
    if not mods:
        raise BuildError(_shown(modules_dir), None, "no modules (*.py files) to bundle")
    for mod in mods.values():
        _check_module(mod)
    for mod in mods.values():
        for dep, name, line in mod.own_imports:
            layer = mod.dep_layers[dep]
            if dep not in mods or mods[dep].layer != layer:
                there = f" (it is modules/{mods[dep].layer}/{dep}.py)" if dep in mods else ""
                raise BuildError(mod.shown, line, f"no modules/{layer}/{dep}.py to import {name!r} from{there}")
            if LAYERS.index(layer) > LAYERS.index(mod.layer):
                raise BuildError(mod.shown, line, f"modules/{mod.layer}/ imports from modules/{layer}/: a module "
                                                  f"imports only from its own layer or the ones before it "
                                                  f"({' -> '.join(LAYERS)})")
            if dep == "main" and mod.name != "main":
                raise BuildError(mod.shown, line, "nothing may import from modules/run/main.py: it is the entry point")
            reexported = any(n == name for _, n, _ in mods[dep].own_imports)  # dep imports it from our modules
            if name not in mods[dep].defs and not reexported:
                imported = next((n.lineno for n in mods[dep].hoisted if name in dict(_bindings(n))), None)
                why = f"{name!r} is not defined at the top level of modules/{layer}/{dep}.py"
                raise BuildError(mod.shown, line, why + (f" (it only imports it, line {imported}: import it from "
                                                         "the library directly)" if imported else ""))
    ordered = [mods[name] for name in _order(mods)]
    _check_namespace(ordered)

    text = _assemble(ordered, landmarks, {})  # first pass: the landmarks' lines are not known yet
    tree = _compiled(text)
    lines = _landmark_lines(tree, text, landmarks)
    text = _assemble(ordered, landmarks, lines)  # the numbers fill fixed lines: nothing below them moves
    tree = _compiled(text)
    if _landmark_lines(tree, text, landmarks) != lines:
        raise BuildError("kernel.py", None, "the table of contents moved its landmarks (build_kernel.py bug)")
    for node in ast.walk(tree):  # the bundle must not need modules/ at run time
        if isinstance(node, ast.ImportFrom):
            roots = [node.module or ""]
        else:
            roots = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if any(r.split(".")[0] == PACKAGE for r in roots):
            raise BuildError("kernel.py", node.lineno, "the bundle still imports from modules (build_kernel.py bug)")
    return text


def main(argv=None, *, landmarks=LANDMARKS):
    parser = argparse.ArgumentParser(prog="build_kernel.py", description="Bundle modules/<layer>/*.py into kernel.py.")
    parser.add_argument("--check", action="store_true", help="exit 1 when OUT is not a fresh build")
    parser.add_argument("--out", type=Path, default=ROOT / "kernel.py", help="default: kernel.py in the repo root")
    parser.add_argument("--modules", type=Path, default=ROOT / PACKAGE, help="modules directory (default: ./modules)")
    args = parser.parse_args(argv)
    try:
        data = build(args.modules, landmarks=landmarks).encode("utf-8")
    except BuildError as exc:
        print(f"build_kernel: {exc}", file=sys.stderr)
        return 1
    out = _shown(args.out)
    current = args.out.read_bytes() if args.out.is_file() else None
    if args.check:
        if current != data:
            why = "is missing" if current is None else "differs from a fresh build of modules/"
            print(f"build_kernel: {out} {why}: run python build_kernel.py", file=sys.stderr)
            return 1
        print(f"build_kernel: {out} is up to date")
        return 0
    if current != data:
        args.out.write_bytes(data)
    lines = data.count(b"\n")
    print(f"build_kernel: {'wrote' if current != data else 'unchanged'} {out} ({lines} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
