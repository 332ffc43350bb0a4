"""Test aid (fault injection lives in the tests): run the ``ebflow`` command line and SIGKILL
the process right after training step ``EBFLOW_TEST_KILL_AT_STEP``. Usable as a script, also
under torchrun: ``python tests/kill_at_step.py train ...``."""

import os
import signal
import sys

from ebflow.cli import main
from ebflow.experiment.training.loop import Trainer

KILL_ENV = "EBFLOW_TEST_KILL_AT_STEP"


def install(step: int) -> None:
    real_after_step = Trainer.after_step

    def after_step(self, out):  # type: ignore[no-untyped-def]
        real_after_step(self, out)
        if self.counters.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer.after_step = after_step  # type: ignore[method-assign]


if __name__ == "__main__":
    install(int(os.environ[KILL_ENV]))
    sys.exit(main(sys.argv[1:]))
