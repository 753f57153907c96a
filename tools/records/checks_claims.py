"""The checks any record folder's files allow (the challenge's folders as well as ours): the code size
against bytes_code, each seed's claims against its log, the claimed means and standard deviation, and
the cap. Claims are submission.json read with Decimal floats, so a claim matches to its printed
precision."""

from __future__ import annotations

import re
import statistics
from decimal import Decimal
from pathlib import Path

from tools.stats import mean_std
from tools.records.base import READABLE, SCRIPT, Check, FolderLog, named_file, skip, warn

# submission.json spells the code size several ways; its per-seed results sit under one of these.
CODE_KEYS = ("bytes_code", "code_bytes", "code_size", "bytes_code_uncompressed")
SEED_KEYS = ("seed_results", "seeds")
SIZE_KEYS = ("artifact_bytes", "bytes_total", "total_bytes")


def is_number(value) -> bool:
    return isinstance(value, (int, Decimal)) and not isinstance(value, bool)


def unit(claim) -> float:
    """One unit in the last printed digit of a claimed number (0 for integers: exact)."""
    if isinstance(claim, Decimal):
        return float(Decimal(1).scaleb(claim.as_tuple().exponent))
    return 0.0


def matches(claim, value) -> bool:
    """A value equals a claim to the claim's printed precision (rounded or truncated: within one unit)."""
    if not is_number(claim) or value is None:
        return False
    return abs(float(claim) - value) <= unit(claim) * (1 + 1e-9) + 1e-12


def seed_claims(sub: dict, where: str = "") -> list[tuple[str, str, dict]]:
    """(where, seed, claim) for every per-seed result in submission.json, nested ones included."""
    found = []
    for key, value in sub.items():
        if not isinstance(value, dict):
            continue
        per_seed = (
            key in SEED_KEYS
            and value
            and all(re.fullmatch(r"\d+", k) and isinstance(v, dict) for k, v in value.items())
        )
        if per_seed:
            found += [(where + key, seed, claim) for seed, claim in value.items()]
        else:
            found += seed_claims(value, f"{where}{key}.")
    return found


def code_size_checks(folder: Path, sub: dict, logs: list[FolderLog]) -> list[Check]:
    """The script's size against submission.json (binding) and the logs (their Code size line)."""
    script, note = named_file(folder, SCRIPT, "train_gpt*.py")
    if not script.is_file():
        return [Check("code size", False, f"no {SCRIPT} in the folder")]
    size = script.stat().st_size
    claims = {k: sub[k] for k in CODE_KEYS if isinstance(sub.get(k), int)}
    checks = [
        Check(f"code size ({k})", v == size, f"{script.name} is {size} bytes, submission.json {k} {v}{note}")
        for k, v in claims.items()
    ]
    # A self-extracting SCRIPT (pack --compress-code) ships READABLE compressed: the runs executed READABLE.
    ran = folder / READABLE if (folder / READABLE).is_file() else script
    ran_size = ran.stat().st_size
    logged = {fl.path.name: fl.run.source_code_bytes or fl.run.code_bytes for fl in logs}
    logged = {name: v for name, v in logged.items() if v is not None}
    same = [name for name, v in logged.items() if v == ran_size]
    other = ", ".join(f"{name} {v}" for name, v in logged.items() if v != ran_size)
    if same:
        checks.append(
            Check("code size (logs)", True, f"{ran.name} is {ran_size} bytes, as {', '.join(same)} report")
        )
    if other and (same or claims):
        checks.append(
            warn("code size (other logs)", f"{other} bytes: these runs used another revision of {ran.name}")
        )
    elif other:
        checks.append(
            Check(
                "code size (logs)",
                False,
                f"{ran.name} is {ran_size} bytes but the logs report {other}: "
                "the script was changed after every run",
            )
        )
    if not claims and not logged:
        checks.append(skip("code size", "neither submission.json nor a log states it"))
    return checks


def score_check(name: str, key: str, claim, logs: list[FolderLog]) -> Check:
    """A claimed score against the score (last final evaluation) of the given logs."""
    scored = [fl for fl in logs if fl.run.score]
    for fl in scored:
        value = getattr(fl.run.score, key)
        if matches(claim, value):
            return Check(name, True, f"claimed {claim}; {fl.path.name}: {value} ({fl.run.score.name})")
    for fl in scored:
        for e in fl.run.finals[:-1]:
            if matches(claim, getattr(e, key)):
                return warn(
                    name,
                    f"claimed {claim} is {fl.path.name}'s earlier evaluation {e.name}; its last final "
                    f"evaluation, {fl.run.score.name}, gives {getattr(fl.run.score, key)}",
                )
    if not scored:
        return Check(
            name, False, f"claimed {claim}; no final evaluation in {', '.join(fl.path.name for fl in logs)}"
        )
    found = ", ".join(f"{fl.path.name} {getattr(fl.run.score, key)}" for fl in scored)
    return Check(name, False, f"claimed {claim}; the logs score {found}")


def seed_checks_any(claims: list[tuple[str, str, dict]], logs: list[FolderLog]) -> list[Check]:
    checks = []
    for where, seed, claim in claims:
        name = f"seed {seed}" + ("" if where in SEED_KEYS else f" ({where})")
        # Logs that name no seed may hold any seed's run.
        mine = [fl for fl in logs if fl.seed == int(seed)] + [fl for fl in logs if fl.seed is None]
        if not mine:
            checks.append(skip(f"{name} log", "no log of this seed in the folder"))
            continue
        for key in ("val_bpb", "val_loss"):
            if key in claim:
                checks.append(score_check(f"{name} {key}", key, claim[key], mine))
                elsewhere = [
                    fl
                    for fl in logs
                    if fl not in mine and fl.run.score and matches(claim[key], getattr(fl.run.score, key))
                ]
                if not checks[-1].ok and elsewhere:
                    checks[-1].detail += (
                        f" (the claimed value is the score of {elsewhere[0].path.name}, seed "
                        f"{elsewhere[0].seed})"
                    )
        scored = [
            fl for fl in mine if fl.run.score and matches(claim.get("val_bpb"), fl.run.score.val_bpb)
        ] or mine
        for key in SIZE_KEYS:
            if is_number(claim.get(key)):
                sizes = {
                    s for fl in scored for s in (fl.run.artifact_bytes, fl.run.total_bytes) if s is not None
                }
                checks.append(
                    Check(
                        f"{name} {key}",
                        claim[key] in sizes,
                        f"claimed {claim[key]}; the log's artifact / total: {sorted(sizes)}",
                    )
                    if sizes
                    else skip(f"{name} {key}", "the log states no size")
                )
    return checks


def mean_checks(sub: dict, claims: list[tuple[str, str, dict]], logs: list[FolderLog]) -> list[Check]:
    """The folder's val_bpb / val_loss (and their std) against the seeds' claims, else the logs."""
    checks = []
    top = [c for where, _, c in claims if where in SEED_KEYS]
    for key in ("val_bpb", "val_loss"):
        if sub.get(key) is None:
            continue
        claimed = sub[key]
        values = [float(c[key]) for c in top if is_number(c.get(key))]
        if top and len(values) == len(top):
            mean, std = mean_std(values)
            checks.append(
                Check(
                    f"{key} mean",
                    matches(claimed, mean),
                    f"claimed {claimed}, mean of the {len(values)} seeds' claims {mean:.8f}",
                )
            )
            checks += std_check(sub, key, values)
        else:
            checks.append(log_mean_check(key, claimed, logs))
    return checks


def std_check(sub: dict, key: str, values: list[float]) -> list[Check]:
    claimed = sub.get(f"{key}_std")
    if claimed is None or len(values) < 2:
        return []
    sample, population = mean_std(values)[1], statistics.pstdev(values)
    detail = f"claimed {claimed}; seeds give sample {sample:.8f}, population {population:.8f}"
    if matches(claimed, sample) or matches(claimed, population):
        which = "sample std (ddof=1)" if matches(claimed, sample) else "population std (ddof=0)"
        return [Check(f"{key}_std", True, f"{detail}: the {which}")]
    # A std is a rough figure: off in its last digits (another rounding of the seeds) is a caveat.
    near = (
        is_number(claimed)
        and min(abs(float(claimed) - sample), abs(float(claimed) - population)) <= 0.05 * sample
    )
    return [warn(f"{key}_std", f"{detail}: within 5%") if near else Check(f"{key}_std", False, detail)]


def log_mean_check(key: str, claimed, logs: list[FolderLog]) -> Check:
    """Without per-seed claims: the mean of the logs' scores, or one log's score (a single-run claim)."""
    name = f"{key} from the logs"
    scored = [fl for fl in logs if fl.run.score]
    if not logs:
        return skip(name, f"claimed {claimed}; no training log in the folder to check it against")
    if not scored:
        return Check(name, False, f"claimed {claimed}; no log in the folder has a final evaluation")
    for metric in (key, "val_bpb"):
        values = [getattr(fl.run.score, metric) for fl in scored]
        mean = mean_std(values)[0]
        single = [fl.path.name for fl, v in zip(scored, values) if matches(claimed, v)]
        how = (
            f"the mean of {len(values)} logs ({mean:.8f})"
            if matches(claimed, mean)
            else f"the score of {', '.join(single)}"
            if single
            else None
        )
        if how and metric == key:
            return Check(name, True, f"claimed {claimed} is {how}")
        if how:
            return warn(
                name, f"claimed {claimed} is {how} in val_bpb: submission.json labels a val_bpb as {key}"
            )
    found = ", ".join(f"{fl.path.name} {getattr(fl.run.score, key)}" for fl in scored)
    return (
        score_check(name, key, claimed, scored)
        if len(scored) == 1
        else Check(name, False, f"claimed {claimed}; neither the mean nor one log's score: {found}")
    )


def size_cap_checks(
    sub: dict, claims: list[tuple[str, str, dict]], logs: list[FolderLog], cap: int
) -> list[Check]:
    sizes = {
        f"submission.json {k}": sub[k] for k in ("bytes_total", "artifact_bytes_max") if is_number(sub.get(k))
    }
    sizes.update(
        {f"seed {seed} {k}": c[k] for _, seed, c in claims for k in SIZE_KEYS if is_number(c.get(k))}
    )
    sizes.update(
        {f"{fl.path.name} total": fl.run.total_bytes for fl in logs if fl.run.total_bytes is not None}
    )
    if not sizes:
        return [skip("cap", "no size stated in submission.json or the logs")]
    over = {k: v for k, v in sizes.items() if v > cap}
    largest = max(sizes, key=sizes.get)
    checks = [
        Check(
            "cap",
            not over,
            f"over the cap of {cap:,}: " + ", ".join(f"{k} {v:,}" for k, v in over.items())
            if over
            else f"every stated size <= {cap:,} (largest: {largest} {sizes[largest]:,})",
        )
    ]
    if is_number(sub.get("bytes_total")):
        totals = {fl.path.name: fl.run.total_bytes for fl in logs if fl.run.total_bytes is not None}
        hit = [n for n, v in totals.items() if v == sub["bytes_total"]]
        checks.append(
            Check("bytes_total", True, f"{sub['bytes_total']} is {', '.join(hit)}'s total")
            if hit
            else warn("bytes_total", f"{sub['bytes_total']} is no log's total ({sorted(totals.values())})")
            if totals
            else skip("bytes_total", "no log states its total")
        )
    return checks
