"""The two settings written in a small language of their own: durations (time_budget: `8h45m`) and fault lists (fault:
`nan@12,slow@0.5`, tests only). Their parsers raise UsageError, so a bad one stops the run in one line."""
import math
import re

from modules.recipe.config import UsageError

MAX_DURATION_S = 7 * 86400.0  # a time budget beyond a week is a typo (100h, 1e300), not a plan
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text):
    """'9h', '90m', '600s', '8h30m', '1h2m3s' or plain seconds ('3600', '12.5') -> seconds."""
    s = str(text).strip().lower().replace(" ", "")
    try:
        value = float(s)
    except ValueError:
        m = _DURATION_RE.match(s)
        if m is None or not any(m.groups()):
            raise UsageError(f"cannot read duration {text!r}: use e.g. 9h, 90m, 600s, 8h30m or plain seconds") from None
        h, mi, se = (float(g) if g else 0.0 for g in m.groups())
        value = h * 3600 + mi * 60 + se
    if not 0 < value < math.inf:  # also refuses nan
        raise UsageError(f"duration {text!r} must be a positive, finite number of seconds")
    if value > MAX_DURATION_S:
        raise UsageError(f"duration {text!r} is more than a week ({MAX_DURATION_S / 3600:.0f}h), the most a run may "
                         "ask for; Kaggle sessions end after 9h")
    return value


FAULT_RE = re.compile(r"(nan|raise|kill|oom)@\d+|slow@\d+(\.\d*)?|slowgen@\d+(\.\d*)?|zipfail")


def parse_faults(text):
    """Config.fault ('nan@12,slow@0.5') -> {kind: number} (-1.0 for zipfail). kill@STEP: rank 1 of several dies by
    SIGKILL; slow@SECONDS: sleep per training step; slowgen@SECONDS: per generation batch once training started."""
    faults = {}
    for item in filter(None, (f.strip() for f in str(text).split(","))):
        if not FAULT_RE.fullmatch(item):
            raise UsageError(f"--set fault={text}: {item!r} is not nan@STEP, raise@STEP, oom@STEP, kill@STEP, "
                             "slow@SECONDS, slowgen@SECONDS or zipfail")
        kind, _, at = item.partition("@")
        faults[kind] = float(at) if at else -1.0
    return faults
