"""build_kernel.py: each bundling rule on small fake modules/ dirs, the output layout, --check, and the real bundle."""
import ast
import dataclasses
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from build_kernel import LANDMARKS, BuildError, build, main  # noqa: E402

# helpers

UTILS = '''
"""Fake utils."""
import os

# helpers

def helper():
    return "helped"
'''

MAIN = '''
"""Fake main."""
import sys

from modules.recipe.utils import helper


def main():
    return helper()


if __name__ == "__main__":
    print("MAIN RAN", main())
'''


def fake(modules_dir):
    """build() on a fake modules/ dir: it has none of the real landmarks, so its header has no table of contents."""
    return build(modules_dir, landmarks=())


def make(tmp_path, files, name="modules"):
    """Write {stem: source} as tmp_path/<name>/recipe/<stem>.py ({"layer/stem": source}: in that layer's folder);
    returns the modules directory."""
    d = tmp_path / name
    for stem, src in files.items():
        path = d / (stem if "/" in stem else f"recipe/{stem}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".py").write_text(textwrap.dedent(src).lstrip("\n"), encoding="utf-8")
    return d


def refused(tmp_path, files, *fragments):
    """build() must raise a BuildError whose message contains every fragment; returns the message."""
    with pytest.raises(BuildError) as info:
        fake(make(tmp_path, files))
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, msg
    assert "\n" not in msg
    return msg


def banners(text):
    return [line.split()[2] for line in text.splitlines() if line.startswith("# ==== modules/")]


# refusals: our own imports

@pytest.mark.parametrize("line, why", [
    ("from modules.recipe.utils import helper as h", "alias"),
    ("from modules.recipe.utils import *", "star import"),
    ("import modules.recipe.utils", "import modules.recipe.utils"),
    ("import modules", "import modules"),
    ("from modules import utils", "from modules import"),
    ("from .utils import helper", "relative import"),
    ("from modules.recipe.utils import nothere",
     "'nothere' is not defined at the top level of modules/recipe/utils.py"),
    ("from modules.recipe.nofile import helper", "no modules/recipe/nofile.py"),
])
def test_refuses_bad_own_import(tmp_path, line, why):
    refused(tmp_path, {"utils": UTILS, "data": f"{line}\n\nX = 1\n"}, "data.py:1:", why)


def test_refuses_own_import_inside_function(tmp_path):
    src = "def f():\n    from modules.recipe.utils import helper\n    return helper()\n"
    refused(tmp_path, {"utils": UTILS, "data": src}, "data.py:2:", "inside a function")


def test_refuses_importing_a_name_the_module_only_imports(tmp_path):
    refused(tmp_path, {"utils": UTILS, "data": "from modules.recipe.utils import os\n"}, "data.py:1:",
            "only imports it")


def test_refuses_import_from_main(tmp_path):
    refused(tmp_path, {"utils": UTILS, "main": MAIN, "data": "from modules.recipe.main import main\n"},
            "data.py:1:", "entry point")


# refusals: third-party imports

@pytest.mark.parametrize("src, line", [
    ("import requests\n", 1),
    ("from requests import get\n", 1),
    ("def f():\n    import requests\n    return requests\n", 2),
    ("class C:\n    def m(self):\n        from yaml import safe_load\n", 3),
])
def test_refuses_disallowed_third_party(tmp_path, src, line):
    refused(tmp_path, {"utils": UTILS, "data": src}, f"data.py:{line}:", "only PIL, numpy, scipy, torch, torchvision")


def test_refuses_same_alias_bound_to_different_things(tmp_path):
    refused(tmp_path, {"utils": "import numpy as np\n", "data": "import numpy.random as np\n"},
            "data.py:1:", "'np' is imported as numpy.random here but imported as numpy in", "utils.py:1")


# refusals: one namespace, importing does nothing

def test_refuses_duplicate_top_level_name(tmp_path):
    msg = refused(tmp_path, {"utils": UTILS, "data": "def helper():\n    return 1\n"}, "'helper'")
    assert "utils.py" in msg and "data.py" in msg


def test_refuses_definition_shadowing_an_import(tmp_path):
    refused(tmp_path, {"utils": UTILS, "data": "os = 'not the module'\n"}, "data.py:1:", "'os' is defined here",
            "imported as os in")


@pytest.mark.parametrize("src, why", [
    ('print("hello")\n', "top-level expression statement"),
    ("try:\n    import torch\nexcept ImportError:\n    torch = None\n", "top-level try"),
    ("for i in range(3):\n    pass\n", "top-level for"),
    ("import os\nos.environ['X'] = '1'\n", "attribute or item"),
    ("import os; X = 1\n", "its own line"),
])
def test_refuses_work_at_import(tmp_path, src, why):
    refused(tmp_path, {"data": src}, "data.py:", why)


def test_refuses_name_guard_outside_main(tmp_path):
    src = 'def f():\n    return 1\n\n\nif __name__ == "__main__":\n    f()\n'
    refused(tmp_path, {"data": src}, "data.py:5:", "outside modules/run/main.py")


def test_refuses_main_guard_not_last(tmp_path):
    refused(tmp_path, {"utils": UTILS, "main": MAIN + "\n\nLATE = 1\n"}, "main.py:", "last statement")


def test_refuses_cycle(tmp_path):
    a = "from modules.recipe.b import g\n\n\ndef f():\n    return g()\n"
    b = "from modules.recipe.a import f\n\n\ndef g():\n    return f()\n"
    refused(tmp_path, {"a": a, "b": b}, "import cycle: a -> b -> a", "a.py:1:")


def test_init_must_be_empty_or_docstring(tmp_path):
    fake(make(tmp_path, {"utils": UTILS, "__init__": '"""The package."""\n'}))
    refused(tmp_path, {"utils": UTILS, "__init__": '"""The package."""\nX = 1\n'}, "__init__.py:2:")


# layout

def test_hoists_and_dedups_imports(tmp_path):
    utils = '''
    """Utils."""
    from __future__ import annotations

    import os
    import numpy as np
    from typing import (
        List,
        Optional,
    )

    def helper(x: Optional[int]) -> List[int]:
        return [x]
    '''
    data = '''
    """Data."""
    from __future__ import annotations
    import os
    import numpy as np
    from typing import Dict, List
    import torch.nn as nn
    from torch import nn

    from modules.recipe.utils import (
        helper,
    )


    def load():
        import json  # a nested import stays where it is
        return json.dumps(helper(1))
    '''
    text = fake(make(tmp_path, {"utils": utils, "data": data}))
    head = text.split("# ==== modules/")[0]
    assert "\nimport numpy as np, os, torch.nn as nn\n" in head  # plain imports packed onto few lines
    assert "from typing import Dict, List, Optional\n" in head
    assert "from torch import nn" not in text  # `import torch.nn as nn` already binds it
    tree = ast.parse(text)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert isinstance(imports[0], ast.ImportFrom) and imports[0].module == "__future__"
    first_banner = text.index("# ==== modules/")
    assert all(text.index(ast.get_source_segment(text, n)) < first_banner for n in imports)
    assert len(imports) == len([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))])
    assert "\n    import json  # a nested import stays where it is\n" in text
    assert "helper,\n)" not in text  # the multi-line own import went away whole
    assert '# ==== modules/recipe/data.py ====\n"""Data."""\n\n\ndef load():' in text


def test_order_follows_dependencies(tmp_path):
    files = {
        "main": MAIN,
        "utils": "from modules.recipe.zeta import Z\n\n\ndef helper():\n    return Z\n",
        "zeta": "Z = 1\n",  # unlisted, but utils needs it: goes just before utils
        "alpha": "A = 1\n",  # unlisted, needs nothing: after the listed ones, before main
        "config": "from modules.recipe.models import M\n\nC = M\n",  # preferred first, needs models: models first
        "models": "M = 2\n",
    }
    assert banners(fake(make(tmp_path, files))) == [
        "modules/recipe/models.py", "modules/recipe/config.py", "modules/recipe/zeta.py", "modules/recipe/utils.py",
        "modules/recipe/alpha.py", "modules/recipe/main.py"]


def test_output_compiles_and_runs_main_guard(tmp_path):
    out = tmp_path / "kernel.py"
    modules = make(tmp_path, {"utils": UTILS, "main": MAIN})
    assert main(["--modules", str(modules), "--out", str(out)], landmarks=()) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# kernel.py — Generative Dog Images") and "# MAINTAINERS: this file is GENERATED" in text
    assert text.endswith('    print("MAIN RAN", main())\n') and not text.endswith("\n\n") and "\r" not in text
    assert '"""Fake utils."""' in text and "# helpers" in text  # docstrings and comments kept
    assert "\n\n\n\n" not in text.split('"""Fake utils."""')[1]  # blank runs where imports were are collapsed
    run = subprocess.run([sys.executable, str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "MAIN RAN helped\n"


def test_blank_lines_inside_statements_stay_verbatim(tmp_path):
    src = 'TEXT = """a\n\n\n\n\nb"""\n\n\n\n\n\nB = 1\n'
    text = fake(make(tmp_path, {"data": src}))
    assert 'TEXT = """a\n\n\n\n\nb"""\n\n\nB = 1\n' in text


def test_reproducible(tmp_path):
    files = {"utils": UTILS, "main": MAIN,
             "data": "import numpy as np\nfrom modules.recipe.utils import helper\n\nD = 1\n"}
    first = fake(make(tmp_path / "one", files))
    assert fake(make(tmp_path / "one", files)) == first
    assert fake(make(tmp_path / "two" / "elsewhere", files)) == first  # no paths of this machine in the output
    assert str(tmp_path) not in first


def test_check(tmp_path, capsys):
    modules = make(tmp_path, {"utils": UTILS, "main": MAIN})
    out = tmp_path / "kernel.py"
    args = ["--modules", str(modules), "--out", str(out)]
    assert main(args + ["--check"], landmarks=()) == 1  # missing
    assert main(args, landmarks=()) == 0
    assert main(args + ["--check"], landmarks=()) == 0
    (modules / "recipe" / "utils.py").write_text(UTILS + "\n\nEXTRA = 1\n", encoding="utf-8")
    capsys.readouterr()
    assert main(args + ["--check"], landmarks=()) == 1
    err = capsys.readouterr().err
    assert err.startswith("build_kernel: ") and err.count("\n") == 1 and "differs" in err


def test_cli_error_is_one_line(tmp_path, capsys):
    modules = make(tmp_path, {"data": 'print("hi")\n'})
    assert main(["--modules", str(modules), "--out", str(tmp_path / "k.py")], landmarks=()) == 1
    err = capsys.readouterr().err
    assert err.startswith("build_kernel: ") and "data.py:1: " in err and err.count("\n") == 1
    assert not (tmp_path / "k.py").exists()


# the real project

REAL_MODULES = ROOT / "modules"
needs_main = pytest.mark.skipif(not (REAL_MODULES / "run" / "main.py").is_file(),
                                reason="modules/run/main.py does not exist yet, so there is no committed kernel.py to "
                                       "compare")


def test_real_modules_build():
    compile(build(REAL_MODULES), "kernel.py", "exec")


@needs_main
def test_committed_kernel_is_fresh():
    assert (ROOT / "kernel.py").read_text(encoding="utf-8") == build(REAL_MODULES), \
        "kernel.py is stale: run python build_kernel.py"


@needs_main
def test_kernel_compiles():
    compile((ROOT / "kernel.py").read_text(encoding="utf-8"), "kernel.py", "exec")


@needs_main
def test_kernel_imports_nothing_from_modules():
    tree = ast.parse((ROOT / "kernel.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "modules" for a in node.names), node.lineno
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and (node.module or "").split(".")[0] != "modules", node.lineno


def test_reexported_own_import_may_be_imported(tmp_path):
    """utils re-exports config's UsageError: `from modules.recipe.utils import UsageError` works for everyone."""
    files = {"config": "class UsageError(Exception):\n    pass\n",
             "utils": "from modules.recipe.config import UsageError\n\n\ndef helper():\n    return UsageError\n",
             "data": "from modules.recipe.utils import UsageError, helper\n\nD = (UsageError, helper)\n"}
    text = fake(make(tmp_path, files))
    assert banners(text) == ["modules/recipe/config.py", "modules/recipe/utils.py", "modules/recipe/data.py"]
    namespace = {}
    exec(compile(text, "kernel.py", "exec"), namespace)
    assert namespace["D"][0] is namespace["UsageError"]


def test_plain_imports_are_packed_within_the_line_limit(tmp_path):
    names = [f"mod_name_number_{i}" for i in range(12)]
    text = fake(make(tmp_path, {"data": "".join(f"import json as {n}\n" for n in names)}))
    lines = [line for line in text.splitlines() if line.startswith("import ")]
    assert 1 < len(lines) < len(names) and all(len(line) <= 120 for line in lines)
    assert sorted(n for line in lines for n in line[len("import "):].split(", ")) == sorted(f"json as {n}" for n in names)
    compile(text, "kernel.py", "exec")


# the top of the real kernel.py: what a notebook user reads first

@needs_main
def test_head_tells_how_to_run_and_configure():
    lines = (ROOT / "kernel.py").read_text(encoding="utf-8").splitlines()
    head = "\n".join(lines[:40])
    for must in ("notebook", "sys.argv = [", "class Config", "python kernel.py", "--time-budget", "--preset",
                 "--data-dir", "--out", "--device", "--set", "images.zip", "/kaggle/working", "build_kernel.py"):
        assert must in head, f"{must!r} missing from the first 40 lines"
    assert head.index("notebook") < head.index("MAINTAINERS")  # how to use it first, how to rebuild it last
    assert all(line.startswith("#") or not line for line in lines[:lines.index("") if "" in lines else 40])


@needs_main
def test_header_recipe_is_the_defaults():
    """The recipe block above the contents: every `name=value` it shows is that Config field's default, and it names
    the numbers a reader compares with the 2nd place's."""
    from modules.recipe.config import Config, apply_overrides
    lines = (ROOT / "kernel.py").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# THE RECIPE"))
    block = "\n".join(lines[start:lines.index("#", start)])
    assert start < 10 and start < next(i for i, line in enumerate(lines) if line.startswith("# CONTENTS"))
    fields = {f.name for f in dataclasses.fields(Config)}
    shown = {name: value for name, value in re.findall(r"\b([a-z_][a-z0-9_]*)=([^\s,;()]+)", block) if name in fields}
    assert set(shown) >= {"g_ch", "d_ch", "z_dim", "loss", "aux_weight", "lr_g", "lr_d", "beta1", "beta2", "batch_size",
                          "ema_decay", "ema_start", "truncation", "max_steps"}
    assert apply_overrides(Config(), shown, "the header") == Config(), shown
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "\n".join(line[2:] for line in block.splitlines()[1:]) in readme  # README's recipe: the same block


def test_modules_comments_describe_the_code_not_its_history():
    """History (which issue asked for what) lives in commit messages; kernel.py's readers never see the issues."""
    found = [f"{path.name}:{n}" for path in sorted((ROOT / "modules").rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
             if re.search(r"\bissues? \d", line, re.IGNORECASE)]
    assert not found, found


@needs_main
def test_config_and_presets_come_first():
    lines = (ROOT / "kernel.py").read_text(encoding="utf-8").splitlines()
    config_line = lines.index("class Config:") + 1
    presets_line = next(i for i, line in enumerate(lines, start=1) if line.startswith("PRESETS = "))
    assert config_line <= 100 and presets_line <= 200, (config_line, presets_line)  # README: Config in the first 100
    assert f"(line {config_line})" in "\n".join(lines[:40])  # the header's pointer is right


@needs_main
def test_header_names_every_preset():
    from modules.recipe.config import PRESETS
    head = "\n".join((ROOT / "kernel.py").read_text(encoding="utf-8").splitlines()[:40])
    line = next(line for line in head.splitlines() if "--preset kaggle" in line)
    named = line.split("recipe:")[1].split(";")[0].replace(" ", "").split("|")
    assert named == list(PRESETS)


@needs_main
def test_editing_a_config_default_in_kernel_py_works(tmp_path):
    """A notebook user edits a default in `class Config` instead of passing flags: the edit is what the run uses."""
    text = (ROOT / "kernel.py").read_text(encoding="utf-8")
    default = '    time_budget: str = "8h45m"'
    assert text.count(default) == 1
    edited = tmp_path / "kernel.py"
    edited.write_text(text.replace(default, '    time_budget: str = "2h"'), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(edited), "--print-config", "-f", "kernel-1.json"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '"time_budget": "2h"' in proc.stdout


# the table of contents (LANDMARKS) and the reading order

def test_missing_landmark_is_a_build_error(tmp_path):
    files = {"utils": UTILS + "\n\nclass Tool:\n    def use(self):\n        return 1\n"}
    text = build(make(tmp_path, files), landmarks=(("a helper", "utils", "helper"), ("a method", "utils", "Tool.use")))
    lines = text.splitlines()
    assert contents(lines) == [(lines.index("def helper():") + 1, "helper"),
                               (lines.index("    def use(self):") + 1, "Tool.use")]
    for landmarks, fragment in [((("gone", "utils", "nothere"),), "landmark 'nothere' (gone) is not defined here"),
                                ((("gone", "utils", "Tool.gone"),), "landmark 'Tool.gone'"),
                                ((("elsewhere", "data", "helper"),), "no such module for landmark 'helper'")]:
        with pytest.raises(BuildError) as info:
            build(make(tmp_path, files), landmarks=landmarks)
        assert fragment in str(info.value) and "\n" not in str(info.value)


def contents(lines):
    """The header's table of contents in the first 60 lines: [(line, dotted name)]."""
    start = next(i for i, line in enumerate(lines[:60]) if line.startswith("# CONTENTS"))
    entries = []
    for line in lines[start + 1:60]:
        m = re.match(r"^#\s+(\d+)\s+([A-Za-z_][\w.]*)\s+\S", line)
        if not m:
            break
        entries.append((int(m.group(1)), m.group(2)))
    return entries


@needs_main
def test_contents_in_the_first_60_lines_name_the_right_lines():
    lines = (ROOT / "kernel.py").read_text(encoding="utf-8").splitlines()
    entries = contents(lines)
    assert sorted(name for _, name in entries) == sorted(name for _, _, name in LANDMARKS)  # all of it before line 60
    assert [n for n, _ in entries] == sorted(n for n, _ in entries)  # in the file's order
    for number, dotted in entries:
        *owner, name = dotted.split(".")
        line = lines[number - 1]
        if owner:  # a method: `    def name(` inside `class Owner`
            assert re.match(rf"    def {name}\(", line), (dotted, number, line)
            cls = next(text for text in reversed(lines[:number - 1]) if text.startswith("class "))
            assert re.match(rf"class {owner[0]}\b", cls), (dotted, cls)
        else:
            assert re.match(rf"(class {name}\b|def {name}\(|{name}(: [^=]+)? = )", line), (dotted, number, line)


@needs_main
def test_recipe_before_machinery():
    """The reading order: the recipe's layer (Config, the model and losses, the step, sampling, the loop), then the
    data, then the run; every module of the real tree sits in a layer folder."""
    paths = [name[len("modules/"):-3] for name in banners((ROOT / "kernel.py").read_text(encoding="utf-8"))]
    layers = [path.split("/")[0] for path in paths]
    order = [path.split("/")[1] for path in paths]
    assert order[0] == "config" and order[-1] == "main"
    assert layers == sorted(layers, key=["recipe", "data", "run"].index)
    recipe = ["layers", "biggan", "models", "losses", "device", "train", "sample", "loop"]
    assert [order.index(m) for m in recipe] == sorted(order.index(m) for m in recipe)
    assert set(layers[order.index(m)] for m in recipe) == {"recipe"}
    assert [p.name for p in REAL_MODULES.glob("*.py") if p.name != "__init__.py"] == []


def test_refuses_a_module_outside_the_layers(tmp_path):
    (make(tmp_path / "a", {"utils": UTILS}) / "stray.py").write_text("X = 1\n", encoding="utf-8")
    refused(tmp_path / "a", {}, "stray.py", "a module lives in a layer's folder")
    refused(tmp_path / "b", {"utils": UTILS, "extra/odd": "X = 1\n"}, "not a layer")


def test_refuses_an_import_from_a_later_layer(tmp_path):
    files = {"run/utils": UTILS, "recipe/config": "from modules.run.utils import helper\n\nC = helper\n"}
    refused(tmp_path, files, "config.py:1:", "modules/recipe/ imports from modules/run/",
            "its own layer or the ones before it")


def test_refuses_an_import_naming_the_wrong_layer(tmp_path):
    files = {"data/utils": UTILS, "run/cli": "from modules.recipe.utils import helper\n\nC = helper\n"}
    refused(tmp_path / "a", files, "cli.py:1:", "no modules/recipe/utils.py", "it is modules/data/utils.py")
    files = {"recipe/utils": UTILS, "run/cli": "from modules.utils import helper\n\nC = helper\n"}
    refused(tmp_path / "b", files, "cli.py:1:", "write `from modules.<layer>.x import a, b`")


def test_refuses_two_modules_of_one_name(tmp_path):
    refused(tmp_path, {"recipe/utils": UTILS, "run/utils": UTILS}, "two modules named 'utils'")
