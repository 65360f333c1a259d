"""Stacked rounds (all rounds of an evaluation in one grouped-convolution network) train each round
exactly as the sequential challenge protocol does (docs/reference.md, "Challenge protocol", "ConvNet",
"DSA augmentation"), to float tolerance, on tiny problems."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from diffdistill.errors import DiffdistillError
from diffdistill.evaluation import entry, protocol, stacked_rounds
from diffdistill.evaluation.stacked_rounds import StackedConvNet
from diffdistill.evaluation.state import EvaluationState
from diffdistill.resume import JobKey

TINY = dict(net_width=8, batch_size=5, log_every=0)  # 12 images: batches 5, 5 and a partial 2
CLOSE = dict(atol=2e-5, rtol=1e-4)


def tiny_set(n: int, channel: int, seed: int, num_classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = labels.view(-1, 1, 1, 1).float() - 1 + 0.5 * torch.randn(n, channel, 8, 8, generator=g)
    return images, labels


def sequential_rounds(x, y, seeds, channel, epochs):
    return [protocol.train_convnet(x, y, num_classes=3, channel=channel, im_size=(8, 8), epochs=epochs,
                                     device="cpu", init_seed=init, generator=torch.Generator().manual_seed(data),
                                     **TINY) for init, data in seeds]


def stacked_run(x, y, seeds, channel, epochs, **kwargs):
    rounds = len(seeds)
    return stacked_rounds.train_stacked(
        x.unsqueeze(0).expand(rounds, *x.shape), y.unsqueeze(0).expand(rounds, len(y)), num_classes=3,
        im_size=(8, 8), epochs=epochs, device="cpu", init_seeds=[init for init, _ in seeds],
        generators=[torch.Generator().manual_seed(data) for _, data in seeds], **TINY, **kwargs)


@pytest.mark.parametrize("channel", [1, 3])  # one channel: the organisers' first conv pads by 3
def test_stacked_rounds_end_with_the_weights_of_sequential_rounds(channel):
    x, y = tiny_set(12, channel, 0)
    seeds = [(11, 21), (12, 22), (13, 23)]
    epochs = 3  # the lr drops after pass 2 (3 // 2 + 1), so the re-created optimizer trains pass 3
    sequential = sequential_rounds(x, y, seeds, channel, epochs)
    stacked = stacked_run(x, y, seeds, channel, epochs)
    for model, state in zip(sequential, stacked.unpack()):
        assert state.keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(state[key], value, **CLOSE, msg=key)
    start = protocol.new_model(3, channel, (8, 8), 8, 3, 11).state_dict()
    assert not torch.allclose(start["features.0.weight"], sequential[0].state_dict()["features.0.weight"])


def test_pack_and_unpack_keep_every_round_and_the_forward_pass():
    models = [protocol.new_model(3, 1, (8, 8), 8, 3, seed) for seed in (1, 2)]
    stacked = StackedConvNet.from_models(models, (8, 8))
    for model, back in zip(models, stacked.round_models()):
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
    x = tiny_set(4, 1, 0)[0]
    logits = stacked(x.repeat(1, 2, 1, 1))  # (B, R, K)
    for r, model in enumerate(models):
        torch.testing.assert_close(logits[:, r], model(x), **CLOSE)


def grads_like(models, seed):
    """Per round a ConvNet-shaped set of random tensors, used as gradients."""
    return [protocol.new_model(3, 1, (8, 8), 8, 3, seed + r) for r in range(len(models))]


def test_one_sgd_step_on_stacked_parameters_is_independent_steps_per_round():
    models = [protocol.new_model(3, 1, (8, 8), 8, 3, seed) for seed in (1, 2, 3)]
    stacked = StackedConvNet.from_models(models, (8, 8))
    optimizers = [protocol.sgd(m, 0.01, 0.9, 5e-4) for m in models]
    optimizer = protocol.sgd(stacked, 0.01, 0.9, 5e-4)
    for step in range(4):
        if step == 2:  # the lr drop: new optimizers, momentum buffers dropped, as the reference does
            optimizers = [protocol.sgd(m, 0.001, 0.9, 5e-4) for m in models]
            optimizer = protocol.sgd(stacked, 0.001, 0.9, 5e-4)
        grads = grads_like(models, 10 * step)
        for model, grad in zip(models, grads):
            for p, g in zip(model.parameters(), grad.parameters()):
                p.grad = g.detach().clone()
        for p, g in zip(stacked.parameters(), StackedConvNet.from_models(grads, (8, 8)).parameters()):
            p.grad = g.detach().clone()
        for o in [*optimizers, optimizer]:
            o.step()
    for model, state in zip(models, stacked.unpack()):
        for key, value in model.state_dict().items():
            torch.testing.assert_close(state[key], value, atol=1e-7, rtol=1e-6, msg=key)


def test_rounds_start_from_their_own_weights_and_shuffle_their_own_way(monkeypatch):
    x, y = tiny_set(12, 1, 0)
    built, orders = [], []
    new_model, epoch_draws = protocol.new_model, protocol.epoch_draws
    monkeypatch.setattr(protocol, "new_model", lambda *a: built.append((a[-1], copy.deepcopy(new_model(*a))))
                        or built[-1][1])
    monkeypatch.setattr(protocol, "epoch_draws", lambda *a: orders.append(epoch_draws(*a)) or orders[-1])
    stacked_rounds.train_and_evaluate_stacked(x, y, x, y, num_classes=3, channel=1, im_size=(8, 8), epochs=0,
                                              rounds=3, device="cpu", seed=7, **TINY)
    seeds = protocol.round_seeds(7, 3)
    assert [seed for seed, _ in built] == [init for init, _ in seeds]
    weights = [model.state_dict()["features.0.weight"] for _, model in built]
    assert torch.equal(weights[0], new_model(3, 1, (8, 8), 8, 3, seeds[0][0]).state_dict()["features.0.weight"])
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    first = [order.tolist() for order, _ in orders]  # each round's sample order of pass 0
    assert len(first) == 3 and len({tuple(o) for o in first}) == 3
    assert first[1] == torch.randperm(12, generator=seeds[1][1]).tolist()  # round 1's own generator, first draw


def test_each_round_trains_on_its_own_subset_and_matches_the_sequential_evaluator(monkeypatch):
    x, y = tiny_set(30, 1, 0)
    test_x, test_y = tiny_set(30, 1, 1)
    subsets = [torch.arange(r, 30, 3)[:9] for r in range(3)]  # three different 9-image subsets
    seen = []
    train = stacked_rounds.train_stacked
    monkeypatch.setattr(stacked_rounds, "train_stacked", lambda tx, ty, **kw: seen.append(tx) or train(tx, ty, **kw))
    common = dict(num_classes=3, channel=1, im_size=(8, 8), epochs=2, rounds=3, device="cpu", seed=3,
                  round_indices=subsets, **TINY)
    stacked = stacked_rounds.train_and_evaluate_stacked(x, y, test_x, test_y, **common)
    assert [torch.equal(seen[0][r], x[subsets[r]]) for r in range(3)] == [True] * 3
    sequential = protocol.train_and_evaluate(x, y, test_x, test_y, **common)
    assert stacked["accuracies"] == pytest.approx(sequential["accuracies"], abs=1.01 / len(test_x))
    assert stacked.keys() == sequential.keys() and stacked["train_size"] == 9 and stacked["rounds"] == 3
    with pytest.raises(DiffdistillError, match="subsets of one size"):
        stacked_rounds.train_and_evaluate_stacked(x, y, test_x, test_y, **{**common, "round_indices": [
            subsets[0], subsets[1], subsets[2][:6]]})


def test_bad_round_counts_are_refused():
    x, y = tiny_set(12, 1, 0)
    common = dict(num_classes=3, channel=1, im_size=(8, 8), epochs=0, device="cpu", **TINY)
    with pytest.raises(DiffdistillError, match="rounds must be >= 1"):
        stacked_rounds.train_and_evaluate_stacked(x, y, x, y, rounds=0, **common)
    with pytest.raises(DiffdistillError, match="max_rounds_per_chunk must be >= 1"):
        stacked_rounds.train_and_evaluate_stacked(x, y, x, y, rounds=2, max_rounds_per_chunk=0, **common)


def test_chunks_of_rounds_give_the_unchunked_result_and_say_so(caplog):
    x, y = tiny_set(12, 1, 0)
    common = dict(num_classes=3, channel=1, im_size=(8, 8), epochs=2, rounds=3, device="cpu", seed=5, **TINY)
    whole = stacked_rounds.train_and_evaluate_stacked(x, y, x, y, **common)
    with caplog.at_level(logging.INFO, logger="diffdistill.evaluation.stacked_rounds"):
        chunked = stacked_rounds.train_and_evaluate_stacked(x, y, x, y, max_rounds_per_chunk=2, **common)
    assert chunked["accuracies"] == whole["accuracies"]
    assert len(chunked["seconds_per_round"]) == 3
    assert "training 3 rounds in 2 chunks of at most 2 rounds stacked (memory)" in caplog.text


class KilledAfterSave(EvaluationState):
    """Resume state on disk whose first chunk save after epoch ``stop_after`` kills the run."""

    def __init__(self, folder, stop_after: int):
        super().__init__(folder, JobKey.of({"job": "test"}), every=1)
        self.stop_after = stop_after

    def due(self, epoch):
        return epoch == self.stop_after

    def save_chunk(self, rounds, state):
        super().save_chunk(rounds, state)
        raise KeyboardInterrupt  # killed right after writing the state


def test_a_run_stopped_after_an_epoch_and_resumed_ends_like_an_unbroken_one(tmp_path):
    x, y = tiny_set(12, 1, 0)
    finals = {}
    keep = lambda name: lambda info: finals.__setitem__(name, info["model"].unpack())  # noqa: E731
    common = dict(num_classes=3, channel=1, im_size=(8, 8), epochs=4, rounds=2, device="cpu", seed=9, **TINY)
    unbroken = stacked_rounds.train_and_evaluate_stacked(x, y, x, y, on_epoch=keep("unbroken"), **common)
    state = KilledAfterSave(tmp_path, stop_after=2)  # momentum buffers saved; the lr drop (after pass 3) comes later
    with pytest.raises(KeyboardInterrupt):
        stacked_rounds.train_and_evaluate_stacked(x, y, x, y, state=state, **common)
    saved = state.load_chunk([0, 1])
    assert saved["epoch"] == 2 and len(saved["generators"]) == 2
    state.stop_after = -1  # the second run saves nothing mid-way
    resumed = stacked_rounds.train_and_evaluate_stacked(x, y, x, y, state=state, on_epoch=keep("resumed"), **common)
    assert resumed["accuracies"] == unbroken["accuracies"] and resumed["resumed_rounds"] == [0, 1]
    for a, b in zip(finals["unbroken"], finals["resumed"]):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert not state.chunk_file([0, 1]).exists()  # the finished chunk's state is gone, its rounds recorded
    assert sorted(state.finished_rounds()) == [0, 1]


def test_finished_rounds_are_taken_from_the_state_and_the_rest_trained(tmp_path):
    x, y = tiny_set(12, 1, 0)
    common = dict(num_classes=3, channel=1, im_size=(8, 8), epochs=2, rounds=3, device="cpu", seed=4, **TINY)
    unbroken = stacked_rounds.train_and_evaluate_stacked(x, y, x, y, **common)
    state = EvaluationState(tmp_path, JobKey.of({"job": "test"}))
    state.finish_round(1, 0.123, 1.0)  # as if an earlier run had finished round 2
    result = stacked_rounds.train_and_evaluate_stacked(x, y, x, y, state=state, **common)
    assert result["accuracies"] == [unbroken["accuracies"][0], 0.123, unbroken["accuracies"][2]]
    assert result["resumed_rounds"] == [1]


def test_rounds_that_fit_follow_the_activation_memory():
    # digits 1x8x8, width 128: feature maps 12x12, 6x6 (pooled) -> 6x6, 3x3 -> 3x3: 128 * (144 + 36 + 9) values
    per_round = stacked_rounds.BYTES_PER_ACTIVATION * 100 * 128 * (144 + 36 + 9)
    fit = lambda free: stacked_rounds.rounds_that_fit(5, 100, (1, 8, 8), 128, 3, free)  # noqa: E731
    assert fit(None) == 5  # the CPU: no limit here
    assert fit(2 * 5 * per_round) == 5 and fit(2 * 3 * per_round + 1) == 3
    assert fit(per_round) == 1  # never fewer than one round at a time


def test_stacking_is_chosen_on_cuda_only():
    assert entry.pays_on("cuda") and entry.pays_on(torch.device("cuda", 0))
    assert not entry.pays_on("cpu")


def test_the_fastest_evaluator_is_sequential_on_a_cpu_and_stacked_in_chunks_that_fit_elsewhere(monkeypatch, caplog):
    x, y = tiny_set(12, 1, 0)
    common = dict(num_classes=3, channel=1, im_size=(8, 8), epochs=2, rounds=3, device="cpu", seed=6, **TINY)
    sequential = protocol.train_and_evaluate(x, y, x, y, **common)
    on_cpu = entry.run_rounds(x, y, x, y, **common)
    assert on_cpu["rounds_at_once"] == 1 and on_cpu["accuracies"] == sequential["accuracies"]
    # As on a GPU with room for two rounds' activations at a time (run here on the CPU).
    per_round = stacked_rounds.BYTES_PER_ACTIVATION * 5 * 8 * (144 + 36 + 9)
    monkeypatch.setattr(entry, "pays_on", lambda device: True)
    monkeypatch.setattr(stacked_rounds, "free_memory", lambda device: 2 * 2 * per_round)
    with caplog.at_level(logging.INFO, logger="diffdistill.evaluation.stacked_rounds"):
        stacked = entry.run_rounds(x, y, x, y, **common)
    assert stacked["rounds_at_once"] == 2 and "3 rounds in 2 chunks" in caplog.text
    assert stacked["accuracies"] == pytest.approx(sequential["accuracies"], abs=1e-6)
