"""TRL's flat names read back from a config as they go in (issue 9's `args.<name>`)."""
import copy
import pickle

import pytest

from prefopt import DPOConfig, SFTConfig


def test_flat_names_read_back():
    args = DPOConfig(learning_rate=1e-5, beta=0.2, max_length=256, sync_ref_model=True, ref_model_sync_steps=4, output_dir="x")
    assert (args.learning_rate, args.max_length, args.ref_model_sync_steps, args.output_dir) == (1e-5, 256, 4, "x")
    assert (args.beta, args.label_smoothing, args.loss_type) == (0.2, 0.0, "dpo")  # the loss's, defaults filled
    assert args.per_device_train_batch_size == args.train.per_device_train_batch_size == 4
    assert args.learning_rate is args.train.learning_rate
    assert SFTConfig(learning_rate=3e-5).learning_rate == 3e-5
    assert copy.deepcopy(args).beta == 0.2 and pickle.loads(pickle.dumps(args)).learning_rate == 1e-5
    with pytest.raises(AttributeError, match="has no attribute 'learnig_rate'"):
        args.learnig_rate
