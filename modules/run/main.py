"""The run, straight: config -> prepare (checks, data: a RunSetup) -> start the ranks (one process, torchrun's, or
forked ones) -> run_rank on every rank (device, trainer, plan, training, the zip); --evaluate scores a zip instead,
--generate samples a checkpoint (generate.py).

The only module with side effects. Nothing is lost: whatever ends training (the budget, divergence, an exception, an
interrupt), checkpoint.pt and the zip are written from the best generator the run has, the zip only by a rename after
verification; a problem the user can fix is found before training and ends with one line and exit code 2.
"""
import contextlib
import json
import os
import sys

from modules.recipe.utils import UsageError, check_device, log, say
from modules.run.cli import config_to_json, read_command_line
from modules.run.distributed import DistContext, record_failure
from modules.run.evaluate import NO_FID, copy_check, evaluate_images, read_submission
from modules.run.features import build_feature_extractor
from modules.run.generate import generate_command
from modules.run.launch import fork_workers, torchrun_env
from modules.run.rank import EXIT_ZIP_FAILED, run_rank, sigterm_interrupts
from modules.run.setup import load_training_data, prepare

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130  # exit codes besides 0 and EXIT_ZIP_FAILED
EXIT_REJECTED = 1  # --evaluate: the submission would be rejected (its JSON is printed all the same)


def run(argv=None):
    """The steps of a run -> exit code (see main)."""
    cfg, print_config, given = read_command_line(argv)
    if print_config:
        say(config_to_json(cfg))
        return 0
    if cfg.evaluate:
        return evaluate_command(cfg)
    if cfg.generate:
        return generate_command(cfg, given=given)
    ctx = torchrun_env() or DistContext()  # torchrun: this process is one of its ranks; else rank 0
    with sigterm_interrupts():  # a SIGTERM before training ends like SIGINT: "interrupted", exit 130
        setup = prepare(cfg, ctx)  # checks, then the data (a forked run's ranks share it)
        if setup.world > 1 and ctx.launcher != "torchrun":  # we start ranks 1..N-1: after the data, before CUDA
            ctx = fork_workers(setup.world, lambda wctx: worker_main(wctx, setup), cuda=cfg.device != "cpu")
        return run_rank(ctx, setup)


def worker_main(ctx, setup):
    """A forked rank (1..N-1): run_rank, then leave the process at once (never return into a notebook's loop)."""
    code = 1
    try:
        code = run_rank(ctx, setup)
    except BaseException as exc:  # one line on stderr (prefixed with the rank), the reason in rank 0's store
        record_failure(f"{type(exc).__name__}: {exc}")
        say(f"error: {type(exc).__name__}: {exc}", sys.stderr)
    finally:
        os._exit(code)


def evaluate_command(cfg):
    """--evaluate: stdout carries the JSON object alone (the log goes to stderr) -> 0, or EXIT_REJECTED."""
    with contextlib.redirect_stdout(sys.stderr):
        result = evaluate_submission(cfg)
    say(json.dumps(result, indent=2, default=str))
    if not result["format"]["ok"]:
        say(f"error: {cfg.evaluate} would be rejected: see \"format\" above", sys.stderr)
        return EXIT_REJECTED
    return 0


def evaluate_submission(cfg):
    """--evaluate: the format checks (the kernel's own definition of a valid submission, read first: a bad path fails
    before the data is loaded), then, when at least two images are readable (FID needs two), FID, memorization and
    MiFID against the training data with Inception weights, else the line saying there is no FID and the pixel copy
    check."""
    images, fmt = read_submission(cfg.evaluate)
    result = {"format": fmt}
    if images is None or len(images) < 2:
        result["scores_skipped"] = f"{0 if images is None else len(images)} readable 64x64 images: scores need 2 or more"
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
    """A non-zero exit in a notebook. SystemExit there shows "An exception has occurred, use %tb ..." and a warning;
    this fails the cell the same way (nbclient and Kaggle see an error, later cells do not run) and IPython shows only
    the one line that _render_traceback_ returns, under the error line main() printed."""

    def __init__(self, code):
        self.code = code
        meaning = {EXIT_ZIP_FAILED: "no valid images.zip could be written (--evaluate: the zip would be rejected)",
                   EXIT_INTERRUPTED: "interrupted before the zip",
                   EXIT_USAGE: "a problem you can fix, named in the error line above"}
        super().__init__(f"kernel.py stopped with exit code {code}: {meaning.get(code, 'see above')}")

    def _render_traceback_(self):  # IPython's hook: the lines shown instead of a traceback
        return [f"{type(self).__name__}: {self}"]


def main(argv=None):
    """Entry point: returns the exit code (0 ok, also after a crash or interrupt that still wrote the zip; 1 no valid
    zip could be written, or with --evaluate the zip would be rejected; 2 usage error; 130 interrupted before the
    zip)."""
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
    if code and "ipykernel" in sys.modules:  # a notebook: fail the cell (Save & Run All must not "succeed" without a zip)
        raise KernelExit(code)
    if code:
        sys.exit(code)
