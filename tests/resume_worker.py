"""Trains from a recipe (JSON file) and SIGKILLs itself halfway through writing checkpoint-K.

Usage: python resume_worker.py RECIPE.json K. The model and optimizer of checkpoint-K are on disk by then, its RNG
state and completion marker are not: exactly what a crash or an OOM kill during a save leaves behind.
"""

import json
import os
import signal
import sys

import transformers

import finetune

recipe, kill_at = json.loads(open(sys.argv[1]).read()), int(sys.argv[2])
save_rng_state = transformers.Trainer._save_rng_state


def save_rng_state_or_die(self, output_dir):
    if self.state.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng_state(self, output_dir)


transformers.Trainer._save_rng_state = save_rng_state_or_die
finetune.train(recipe)
raise SystemExit("not killed: the run ended before checkpoint-%d" % kill_at)
