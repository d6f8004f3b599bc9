"""Roll a staged export out to a serving model repository: check it, canary it, promote or roll back.

  aq-rollout STAGED --repository SERVING [--gateway URL] [--canary-share 0.1] [--canary-seconds 60]
  aq-rollout --repository SERVING --promote | --rollback          (by hand)

The flow:
 1. Checks, before any traffic (export/rollout_checks.py): the staged manifest loads; every served
    file exists and matches its sha256; the export gates hold on the figures it recorded; every served
    variant loads in ONNX Runtime and answers seeded probe images with finite logits; classes, image
    size and input/output names are the serving version's; its accuracy under corruptions is within
    export.max_shift_drop points of the serving version's. Any failure: refused, nothing added (exit 2).
 2. The staged repository becomes the next version N of SERVING (versions.json: staged).
 3. Without --gateway there is nothing to watch: N serves at once, on the checks alone.
    With --gateway: N becomes the canary (versions.json; Triton's version_policy [serving, N]); the
    gateway's workers load and warm it in the background; aq-rollout waits until they hold it
    (--load-timeout), then watches the gateway's /metrics for --canary-seconds, printing one line a
    second: the canary's requests and errors, the mirrored comparisons and their agreement with the
    serving version, and the within-budget share of both versions. It rolls back early on a clear
    failure (agreement far below --min-agreement, errors far above --max-error-rate, latency far
    worse than the serving version's), and promotes only when the time is up and every signal held.
    Too little traffic to judge at the end rolls back, saying so.
 4. Promotion: versions.json says N serves, manifest.json is N's, Triton's policy [N], and MLflow's
    `champion` alias of each variant's registered model points at a model version for N.
    Roll-back: N is failed (with why, and the figures) and the serving version keeps serving.
    Every decision is logged with its figures and recorded in versions.json's history.
    Ctrl-C while watching rolls the canary back.

By hand: --promote makes the current canary serve; --rollback fails the current canary, or, with no
canary, retires the serving version and brings back the one that served before it (and MLflow's
`champion` alias with it).

Exit codes: 0 promoted, 1 rolled back (the reason and the figures are logged),
2 refused before any traffic or nothing to do (nothing was changed).

Example:
  aq-export --checkpoint runs/default/best.pt --repository /tmp/staged --no-mlflow
  aq-rollout /tmp/staged --repository model_repository --gateway http://127.0.0.1:8000 \\
      --canary-share 0.1 --canary-seconds 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from adaptive_quant.cli import LOG_LEVELS, setup_logging
from adaptive_quant.core.canary import CanaryCounts, CanaryThresholds, Verdict, counts_since, decide, describe
from adaptive_quant.core.manifest import ManifestError
from adaptive_quant.core.versions import (
    VersionState,
    index_lock,
    load_version_manifest,
    promoted,
    read_index,
    rolled_back,
    utc_now,
    with_canary,
    write_index,
)
from adaptive_quant.export.champion import promote_champion, restore_champion
from adaptive_quant.export.rollout_checks import check_staged
from adaptive_quant.export.versions import add_serving_version, add_version, publish_manifest, set_version_policy
from adaptive_quant.tools.gateway_metrics import GatewayUnreachable, fetch, parse_counts, parse_workers

log = logging.getLogger("adaptive_quant.rollout")

EXIT_PROMOTED, EXIT_ROLLED_BACK, EXIT_REFUSED = 0, 1, 2
TICK_S = 1.0  # s between scrapes and progress lines
GATEWAY_LOST_S = 15.0  # s without an answer from /metrics before the canary is rolled back
CHAMPION_EVENT = "champion"  # versions.json history: where MLflow's alias pointed before a promotion


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = CanaryThresholds()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("staged", nargs="?", help="the staged repository (aq-export into a fresh folder)")
    p.add_argument("--repository", required=True, help="the serving model repository")
    p.add_argument("--gateway", metavar="URL", help="the gateway's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--canary-share", type=float, default=0.1, help="share of requests the canary serves (%(default)s)")
    p.add_argument("--mirror-share", type=float, default=0.25, help="share of serving requests mirrored (%(default)s)")
    p.add_argument("--canary-seconds", type=float, default=60.0, help="s to watch the canary (%(default)s)")
    p.add_argument("--min-agreement", type=float, default=d.min_agreement, help="0..1 (%(default)s)")
    p.add_argument("--min-mirrored", type=int, default=d.min_mirrored, help="comparisons to judge (%(default)s)")
    p.add_argument("--min-requests", type=int, default=d.min_requests, help="canary requests to judge (%(default)s)")
    p.add_argument("--max-error-rate", type=float, default=d.max_error_rate, help="0..1 (%(default)s)")
    p.add_argument(
        "--max-budget-drop",
        type=float,
        default=d.max_budget_drop_points,
        help="points the canary's within-budget share may fall below the serving version's (%(default)s)",
    )
    p.add_argument(
        "--load-timeout", type=float, default=120.0, help="s to wait for the gateway to hold the canary (%(default)s)"
    )
    p.add_argument("--no-mlflow", action="store_true", help="leave MLflow's champion alias alone")
    hand = p.add_mutually_exclusive_group()
    hand.add_argument("--promote", action="store_true", help="make the current canary serve (by hand)")
    hand.add_argument("--rollback", action="store_true", help="roll back the canary, or the last promotion (by hand)")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    args = p.parse_args(argv)
    if (args.promote or args.rollback) == (args.staged is not None):
        p.error("give either STAGED (a roll-out) or --promote / --rollback (by hand), not both or neither")
    for name in ("canary_share", "mirror_share"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} is a share in 0..1, got {getattr(args, name)}")
    try:
        thresholds_from(args)  # checked now, not once the canary takes traffic
    except ValueError as exc:
        p.error(str(exc))
    return args


def thresholds_from(args: argparse.Namespace) -> CanaryThresholds:
    return CanaryThresholds(
        min_agreement=args.min_agreement,
        min_mirrored=args.min_mirrored,
        max_error_rate=args.max_error_rate,
        max_budget_drop_points=args.max_budget_drop,
        min_requests=args.min_requests,
    )


def say(line: str) -> None:
    print(line, flush=True)


# ---- decisions on the repository -------------------------------------------------------------


def record_champion(serving: Path, version: int, previous: dict[str, str | None]) -> None:
    with index_lock(serving):
        index = read_index(serving)
        event = {
            "at": utc_now(),
            "event": CHAMPION_EVENT,
            "version": version,
            "detail": f"MLflow champion → version {version}",
            "previous": previous,
        }
        write_index(serving, dataclasses.replace(index, history=(*index.history, event)))


def promote(serving: Path, detail: str, mlflow: bool) -> int:
    with index_lock(serving):
        index = read_index(serving)
        new = promoted(index, utc_now(), detail)
        write_index(serving, new)  # the gateways switch on this
        publish_manifest(serving, new.serving)
        set_version_policy(serving, [new.serving])
    log.info("promoted version %d (version %d retired): %s", new.serving, index.serving, detail)
    if mlflow:
        previous = promote_champion(serving, load_version_manifest(serving, new.serving), new.serving)
        if previous is not None:
            record_champion(serving, new.serving, previous)
    say(f"promoted: version {new.serving} serves")
    return EXIT_PROMOTED


def roll_back(serving: Path, detail: str, mlflow: bool) -> int:
    with index_lock(serving):
        index = read_index(serving)
        new = rolled_back(index, utc_now(), detail)
        if index.canary is None:
            # a promotion undone: the gateways load the previous version back (load_model applies the
            # policy) while they still serve this one, so Triton keeps both until the next roll-out
            set_version_policy(serving, [index.serving, new.serving])
        write_index(serving, new)
        if index.canary is None:  # the previous version's manifest is the repository's again
            publish_manifest(serving, new.serving)
        else:  # the canary goes: its backends' retire() lets Triton unload it once quiet
            set_version_policy(serving, [new.serving])
    gone = index.canary.version if index.canary is not None else index.serving
    log.warning("rolled back version %d (version %d serves): %s", gone, new.serving, detail)
    if mlflow and index.canary is None:
        moved = [h for h in index.history if h.get("event") == CHAMPION_EVENT and int(h["version"]) == gone]
        if moved:
            restore_champion(moved[-1].get("previous") or {})
        else:
            log.info("MLflow: no champion move recorded for version %d; the alias is left as it is", gone)
    say(
        f"rolled back: version {gone} {'failed' if index.canary is not None else 'retired'}, version {new.serving} serves"
    )
    return EXIT_ROLLED_BACK


# ---- watching the gateway --------------------------------------------------------------------


def wait_for_canary(url: str, version: int, serving_version: int, timeout_s: float) -> str | None:
    """None once every worker holds `version` as the canary; else why not (a load failure, a timeout)."""
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        try:
            workers = parse_workers(fetch(url))
        except GatewayUnreachable as exc:
            if elapsed > timeout_s:
                return f"the gateway did not answer while loading version {version}: {exc}"
            say(f"[load {elapsed:4.0f} s] gateway not answering: {exc}")
            time.sleep(TICK_S)
            continue
        mine = workers.get(version, {})
        holding, failed = mine.get("canary", 0), mine.get("failed", 0)
        expected = max(1, workers.get(serving_version, {}).get("serving", 0))
        if failed:
            return f"{failed} gateway worker(s) failed to load version {version} (see the gateway's log and /v1/status)"
        if holding >= expected:
            say(f"[load {elapsed:4.0f} s] {holding} of {expected} worker(s) hold version {version}: watching")
            return None
        if elapsed > timeout_s:
            return (
                f"the gateway did not hold version {version} within {timeout_s:g} s ({holding} of {expected} "
                f"worker(s); loading {mine.get('loading', 0)}): does it follow versions.json (rollout.follow)?"
            )
        say(
            f"[load {elapsed:4.0f} s] waiting for the gateway to load version {version}: {holding} of {expected} "
            f"worker(s) hold it, {mine.get('loading', 0)} loading"
        )
        time.sleep(TICK_S)


def pending(canary: CanaryCounts, t: CanaryThresholds, elapsed_s: float, canary_seconds: float) -> str:
    """What the canary still waits for, in words."""
    needs = []
    if canary.total < t.min_requests:
        needs.append(f"{t.min_requests - canary.total:.0f} more canary requests")
    if canary.mirrored < t.min_mirrored:
        needs.append(f"{t.min_mirrored - canary.mirrored:.0f} more mirrored comparisons")
    left = f"{max(0.0, canary_seconds - elapsed_s):.0f} s left"
    return left + (", needs " + ", ".join(needs) if needs else "")


def watch(
    url: str, serving: Path, version: int, serving_version: int, t: CanaryThresholds, canary_seconds: float
) -> Verdict | str:
    """The verdict on the canary; a str when someone decided by hand meanwhile (what they decided)."""
    before = parse_counts(fetch(url))
    start = time.monotonic()
    last_answer = start
    while True:
        time.sleep(max(0.0, TICK_S - (time.monotonic() - start) % TICK_S))
        elapsed = time.monotonic() - start
        index = read_index(serving)
        if index.canary is None or index.canary.version != version:
            return str(index.state_of(version))
        try:
            text = fetch(url)
        except GatewayUnreachable as exc:
            if time.monotonic() - last_answer > GATEWAY_LOST_S:
                reason = f"the gateway stopped answering /metrics for {GATEWAY_LOST_S:g} s: {exc}"
                return Verdict("rollback", reason, {"elapsed_s": round(elapsed, 1)})
            say(f"[{elapsed:4.0f} s] gateway not answering /metrics: {exc}")
            continue
        last_answer = time.monotonic()
        failed = parse_workers(text).get(version, {}).get("failed", 0)
        now = parse_counts(text)
        canary = counts_since(now, before, version)
        verdict = decide(counts_since(now, before, serving_version), canary, t, elapsed, canary_seconds)
        if failed:
            reason = f"{failed} gateway worker(s) report version {version} failed ({describe(verdict.figures)})"
            return Verdict("rollback", reason, verdict.figures)
        if verdict.action != "wait":
            return verdict
        say(
            f"[{elapsed:4.0f}/{canary_seconds:.0f} s] {describe(verdict.figures)}; {pending(canary, t, elapsed, canary_seconds)}"
        )


# ---- the flows -------------------------------------------------------------------------------


def roll_out(staged: Path, serving: Path, args: argparse.Namespace) -> int:
    index = read_index(serving)
    if index.canary is not None:
        log.error("refused: version %d is the canary already; run --promote or --rollback first", index.canary.version)
        return EXIT_REFUSED
    serving_manifest = load_version_manifest(serving, index.serving)
    report = check_staged(staged, serving_manifest)
    for note in report.notes:
        log.warning("%s", note)
    if not report.passed:
        for line in report.failures:
            log.error("check failed: %s", line)
        log.error("refused %s: %d check(s) failed; nothing was added, version %d keeps serving",
                  staged, len(report.failures), index.serving)  # fmt: skip
        return EXIT_REFUSED
    log.info("checks passed: %s", staged)
    mlflow = not args.no_mlflow
    if not args.gateway:
        log.info("no --gateway: nothing to watch; the new version serves on the checks alone")
        detail = "promoted on the checks alone (no --gateway to watch)"
        version, manifest = add_serving_version(staged, serving, source=str(staged.resolve()), detail=detail)
        log.info("promoted version %d: %s", version, detail)
        if mlflow and (previous := promote_champion(serving, manifest, version)) is not None:
            record_champion(serving, version, previous)
        say(f"promoted: version {version} serves (no canary: no --gateway)")
        return EXIT_PROMOTED
    try:
        fetch(args.gateway)
    except GatewayUnreachable as exc:
        log.error("refused: %s; nothing was added", exc)
        return EXIT_REFUSED
    version, _ = add_version(staged, serving, source=str(staged.resolve()))
    with index_lock(serving):
        index = with_canary(read_index(serving), version, args.canary_share, args.mirror_share, utc_now())
        write_index(serving, index)
        set_version_policy(serving, index.live())
    log.info(
        "version %d is the canary: share %g, mirror share %g, %g s", version, args.canary_share,
        args.mirror_share, args.canary_seconds,
    )  # fmt: skip
    try:
        why = wait_for_canary(args.gateway, version, index.serving, args.load_timeout)
        if why is not None:
            return roll_back(serving, why, mlflow)
        verdict = watch(args.gateway, serving, version, index.serving, thresholds_from(args), args.canary_seconds)
    except KeyboardInterrupt:
        return roll_back(serving, "interrupted by the operator (Ctrl-C) while the canary ran", mlflow)
    except Exception as exc:  # the canary takes traffic: never leave it unwatched
        log.exception("aq-rollout failed while version %d was the canary", version)
        return roll_back(serving, f"aq-rollout failed while the canary ran: {type(exc).__name__}: {exc}", mlflow)
    if isinstance(verdict, str):
        log.warning("version %d was decided by hand meanwhile: %s", version, verdict)
        return EXIT_PROMOTED if verdict == VersionState.SERVING.value else EXIT_ROLLED_BACK
    log.info("decision: %s; figures %s", verdict.reason, json.dumps(verdict.figures))
    if verdict.action == "promote":
        return promote(serving, verdict.reason, mlflow)
    return roll_back(serving, verdict.reason, mlflow)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one GET a second: not news
    serving = Path(args.repository).resolve()
    try:
        if args.promote:
            return promote(serving, "promoted by hand (aq-rollout --promote)", not args.no_mlflow)
        if args.rollback:
            return roll_back(serving, "rolled back by hand (aq-rollout --rollback)", not args.no_mlflow)
        return roll_out(Path(args.staged), serving, args)
    except (ManifestError, ValueError, OSError) as exc:
        # before the canary takes traffic (a transition refused, a repository that cannot be read or
        # written): nothing was made live
        log.error("refused: %s", exc)
        return EXIT_REFUSED
