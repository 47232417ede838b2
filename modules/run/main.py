"""The run, straight: config -> prepare (checks, data) -> the ranks (one process, torchrun's, or forked) -> run_rank on
each; --evaluate scores a zip instead, --generate samples a checkpoint (generate.py). The only module with side
effects. Whatever ends training, the checkpoint and the zip are written; a problem the user can fix ends before
training with one line and exit code 2.
"""
import contextlib
import json
import os
import signal
import sys

from modules.recipe.utils import UsageError, check_device, log, say
from modules.run.cli import config_to_json, read_command_line
from modules.run.distributed import DistContext, fork_workers, record_failure, torchrun_env
from modules.run.evaluate import NO_FID, copy_check, evaluate_images, read_submission
from modules.run.generate import generate_command
from modules.run.metrics import build_feature_extractor
from modules.run.rank import EXIT_ZIP_FAILED, run_rank, signal_handlers
from modules.run.setup import load_training_data, prepare

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130  # exit codes besides 0 and EXIT_ZIP_FAILED
EXIT_REJECTED = 1  # --evaluate: the submission would be rejected (its JSON is printed all the same)


def run(argv=None):
    cfg, print_config, given = read_command_line(argv)
    if print_config:
        say(config_to_json(cfg))
        return 0
    if cfg.evaluate:
        return evaluate_command(cfg)
    if cfg.generate:
        return generate_command(cfg, given=given)
    ctx = torchrun_env() or DistContext()
    with signal_handlers(signal.default_int_handler, signal.SIGTERM):  # until training: SIGTERM ends as SIGINT does
        setup = prepare(cfg, ctx)
        if setup.world > 1 and ctx.launcher != "torchrun":  # forked after the data (shared), before CUDA
            ctx = fork_workers(setup.world, lambda wctx: worker_main(wctx, setup), cuda=cfg.device != "cpu")
        return run_rank(ctx, setup)


def worker_main(ctx, setup):
    """A forked rank: run_rank, then leave the process at once (never return into a notebook's loop)."""
    code = 1
    try:
        code = run_rank(ctx, setup)
    except BaseException as exc:  # one line on stderr (prefixed with the rank), the reason in rank 0's store
        record_failure(f"{type(exc).__name__}: {exc}")
        say(f"error: {type(exc).__name__}: {exc}", sys.stderr)
    finally:
        os._exit(code)


def evaluate_command(cfg):
    """--evaluate: stdout carries the JSON alone (the log goes to stderr) -> 0, or EXIT_REJECTED."""
    with contextlib.redirect_stdout(sys.stderr):
        result = evaluate_submission(cfg)
    say(json.dumps(result, indent=2, default=str))
    if not result["format"]["ok"]:
        say(f"error: {cfg.evaluate} would be rejected: see \"format\" above", sys.stderr)
        return EXIT_REJECTED
    return 0


def evaluate_submission(cfg):
    """--evaluate: the format checks (first: a bad path fails before the data is read), then with two or more images,
    FID, memorization and MiFID with Inception weights, else the pixel copy check."""
    images, fmt = read_submission(cfg.evaluate)
    result = {"format": fmt}
    n = 0 if images is None else len(images)
    if n < 2:
        result["scores_skipped"] = f"{n} readable 64x64 images: scores need 2 or more"
        return result
    device = check_device(cfg.device)
    data, _demo_dir = load_training_data(cfg)
    extractor = build_feature_extractor(cfg.feature_weights or None, device)
    if extractor is None:
        log(NO_FID)
        result["self_check"] = copy_check(images, data.images, device=device)
    else:
        result.update(evaluate_images(images, data.reference, extractor, crops_uint8=data.images))
    return result


class KernelExit(Exception):
    """A non-zero exit in a notebook: fails the cell as SystemExit would (later cells do not run), shown as one line
    instead of SystemExit's "An exception has occurred, use %tb" and warning."""

    def __init__(self, code):
        self.code = code
        meaning = {EXIT_ZIP_FAILED: "no valid images.zip could be written (--evaluate: the zip would be rejected)",
                   EXIT_INTERRUPTED: "interrupted before the zip",
                   EXIT_USAGE: "a problem you can fix, named in the error line above"}
        super().__init__(f"kernel.py stopped with exit code {code}: {meaning.get(code, 'see above')}")

    def _render_traceback_(self):  # IPython's hook: the lines shown instead of a traceback
        return [f"{type(self).__name__}: {self}"]


def main(argv=None):
    """-> exit code: 0 ok (also after a crash or interrupt that still wrote the zip); 1 no valid zip could be written
    (--evaluate: it would be rejected); 2 usage error; 130 interrupted before the zip."""
    try:
        return run(argv)
    except SystemExit as exc:  # argparse's --help: exit 0 as a return value (a notebook cell then ends without error)
        if exc.code in (0, None):
            return 0
        raise
    except UsageError as exc:
        say(f"error: {exc}", sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        say("interrupted", sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    code = main()
    if code and "ipykernel" in sys.modules:  # Save & Run All must not "succeed" without a zip
        raise KernelExit(code)
    if code:
        sys.exit(code)
