"""torchrun entry point for tests/test_distributed.py: the CLI, with a failure injected on one rank.

EMBEDCACHE_TEST_FAIL_RANK=R makes rank R fail; EMBEDCACHE_TEST_FAIL_HOW says how:
``kill`` SIGKILLs the process after it wrote EMBEDCACHE_TEST_FAIL_AFTER batches of its shard (a
rank lost mid-run), ``kill-partial`` of the in-progress file (one process);
``kill-after-epoch`` after it saved that many fine-tuning states;
EMBEDCACHE_TEST_FAIL_SIGNAL sends another signal instead (SIGTERM, SIGHUP); ``pause`` and
``pause-after-epoch`` print "paused" to stderr there and sleep, holding the output;
``refuse`` makes building the backbone raise an expected error (a bad argument seen by that
rank only).
EMBEDCACHE_TEST_FREEZE_FROM=N sets ``--compile auto``'s CPU freezing threshold to N images, so a
test can cross it with a handful of images.
"""

import os
import signal

from embedcache import backbones, cache, checkpoint, extraction, runtime
from embedcache.cli import main
from embedcache.errors import EmbedcacheError


def _inject() -> None:
    if "EMBEDCACHE_TEST_FREEZE_FROM" in os.environ:
        runtime.FREEZE_FROM_IMAGES = int(os.environ["EMBEDCACHE_TEST_FREEZE_FROM"])
    rank = os.environ.get("EMBEDCACHE_TEST_FAIL_RANK")
    if rank is None or rank != os.environ.get("RANK"):
        return
    how = os.environ["EMBEDCACHE_TEST_FAIL_HOW"]
    if how in ("kill", "kill-partial", "kill-after-epoch"):
        owner, name = {
            "kill": (cache.ShardFile, "write"),
            "kill-partial": (cache.PartialCache, "write"),  # one process writes there
            "kill-after-epoch": (checkpoint.FinetuneState, "save"),
        }[how]
        after = int(os.environ.get("EMBEDCACHE_TEST_FAIL_AFTER", "1"))
        sig = getattr(signal, os.environ.get("EMBEDCACHE_TEST_FAIL_SIGNAL", "SIGKILL"))
        original, done = getattr(owner, name), []

        def then_die(self, *args):
            result = original(self, *args)
            done.append(1)
            if len(done) >= after:
                os.kill(os.getpid(), sig)
            return result

        setattr(owner, name, then_die)
    elif how in ("pause", "pause-after-epoch"):  # hold the output: stop after AFTER writes
        import sys
        import time

        owner, name = (
            (cache.PartialCache, "write") if how == "pause" else (checkpoint.FinetuneState, "save")
        )
        after, original, done = (
            int(os.environ.get("EMBEDCACHE_TEST_FAIL_AFTER", "1")),
            getattr(owner, name),
            [],
        )

        def then_pause(self, *args):
            result = original(self, *args)
            done.append(1)
            if len(done) == after:
                print("paused", file=sys.stderr, flush=True)
                time.sleep(120)
            return result

        setattr(owner, name, then_pause)
    elif how == "refuse":

        def refuse(*args, **kwargs):
            raise EmbedcacheError("weights file only-rank-1.pt does not exist")

        backbones.build_backbone = refuse
        extraction.build_backbone = refuse


if __name__ == "__main__":
    _inject()
    main(prog_name="embedcache")
