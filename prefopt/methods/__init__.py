"""Methods that are more than one training run: short drivers over the same Trainer.

Each is ``run(config) -> {"final_model", "rounds"}`` with its CLI verb and default loss.
"""
from prefopt.methods.iterative import run_iterative
from prefopt.methods.spin import run_spin
from prefopt.methods.stepwise import run_stepwise

METHODS = {"spin": (run_spin, "spin"), "iterative": (run_iterative, "dpo"), "stepwise": (run_stepwise, "dpo")}
