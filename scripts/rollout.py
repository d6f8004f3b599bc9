"""Roll a staged export out to a serving model repository: check it, canary it, promote or roll back.

A thin wrapper over `adaptive_quant.cli.rollout` (installed as the console script `aq-rollout` too);
`--help` explains the flow, the options and the exit codes.
"""

from adaptive_quant.cli.rollout import main

if __name__ == "__main__":
    raise SystemExit(main())
