"""torchrun, ending in one line instead of a traceback when the workers stopped on a user error.

    python -m dist_gru.torchrun --nproc-per-node 2 -m dist_gru train --config configs/adding.yaml

Everything is torchrun's own (`torch.distributed.run`: arguments, rendezvous, restarts, signal
forwarding), except the end of a job whose first failed worker exited with code 2: it printed an
`error:` line (rank 0 prints the errors every rank shares, and the other ranks leave after it), and
torchrun's ChildFailedError traceback, some 30 lines, would bury it. This prints one line and exits 2, as a
single process does. Every other failure keeps torchrun's report and exit code. launch/torchrun.sh
and slurm/train.sbatch run it.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

USER_ERROR = 2  # what every dist-gru command exits with after an `error:` line


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, first = exc.get_first_failure()  # the others were stopped because of it
        if first.exitcode != USER_ERROR:
            raise
        print(f"dist-gru torchrun: stopped: rank {rank} exited with {USER_ERROR} (the error above)", file=sys.stderr)
        return USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
