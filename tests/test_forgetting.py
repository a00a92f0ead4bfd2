"""bench/forgetting.py's probes against their definitions, on tiny models: a model compared with
itself is at distance 0, a different one is not, and the NLL is the token cross-entropy."""

import forgetting  # bench/forgetting.py (pytest's pythonpath)
import torch
import torch.nn.functional as F

from pace_llm.assets.tiny import tiny_model


def test_a_model_is_at_zero_distance_from_itself_and_not_from_another():
    base, other = tiny_model("llama", seed=0).eval(), tiny_model("llama", seed=1).eval()
    sequences = [{"prompt_tokens": 3, "ids": [5, 9, 17, 23, 40, 41, 7]}, {"prompt_tokens": 2, "ids": [8, 30, 31, 50]}]
    assert forgetting.kl_to_base(base, base, sequences) == 0
    assert forgetting.kl_to_base(base, other, sequences) > 0
    samples = [{"input_ids": [5, 9, 17, 23, 40], "labels": [-100, -100, 17, 23, 40]}]

    class Samples(list):  # the probe takes a datasets.Dataset; .select is all it uses
        def select(self, indices):
            return Samples(self[i] for i in indices)

    assert forgetting.fp_distance(base, base, Samples(samples)) == 0
    assert forgetting.fp_distance(base, other, Samples(samples)) > 0


def test_kl_to_base_is_the_mean_over_completion_tokens():
    base, tuned = tiny_model("llama", seed=0).eval(), tiny_model("llama", seed=2).eval()
    ids = [5, 9, 17, 23, 40, 41]
    with torch.no_grad():
        lp_b = F.log_softmax(base(torch.tensor([ids])).logits[0], -1)
        lp_t = F.log_softmax(tuned(torch.tensor([ids])).logits[0], -1)
    per_position = (lp_b.exp() * (lp_b - lp_t)).sum(-1)
    expected = per_position[3:5].mean().item()  # completion tokens 40, 41 are predicted at positions 3, 4
    assert abs(forgetting.kl_to_base(base, tuned, [{"prompt_tokens": 4, "ids": ids}]) - expected) < 1e-5
