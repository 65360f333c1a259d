"""Sampling: one guided batch, class-balanced labels, the time budget (fake clock) and OOM halving."""

import json
import math

import pytest
import torch

from diffdistill.data import from_model_range
from diffdistill.diffusion import sampling, uvit
from diffdistill.diffusion.sampler_settings import SamplerSettings
from diffdistill.diffusion.sampling import balanced_labels, generate, sample_budgeted
from diffdistill.diffusion.sampling_summary import BatchTime, SamplingSummary, ShardRun
from diffdistill.errors import DiffdistillError
from helpers import ENV, FakeClock, sampling_job

FAST = dict(steps=3, order=2, method="multistep", algorithm="dpmsolver++", t_end=1e-3)
UVIT_SAMPLER = dict(steps=50, order=3, method="singlestep", algorithm="dpmsolver", t_end=1e-4)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return uvit.build("uvit_tiny_test", num_classes=3).eval()


def fake_generate(clock, costs):
    """Stand-in for sampling.generate: each call costs the next of ``costs`` seconds on ``clock``."""
    calls = []

    def run(model, labels, settings, *, device, generator=None, seed=None, mode_targets=None):
        clock.now += costs[min(len(calls), len(costs) - 1)]
        calls.append(labels.clone())
        return torch.zeros(labels.shape[0], 3, 8, 8, dtype=torch.uint8)

    return run, calls


def budgeted_on_fakes(monkeypatch, costs, num_classes, **kwargs):
    """sample_budgeted on a fake generate of ``costs`` seconds per call and a fresh FakeClock
    (device "cpu", seed 0 unless given); returns (result, the labels of each generate call)."""
    clock = FakeClock()
    run, calls = fake_generate(clock, costs)
    monkeypatch.setattr(sampling, "generate", run)
    result = sample_budgeted(object(), num_classes, SamplerSettings(), **{"device": "cpu", "seed": 0, **kwargs},
                             clock=clock)
    return result, calls


# ----------------------------------------------------------------------------- balanced labels


def test_balanced_labels_cycle_and_every_prefix_is_balanced():
    labels = balanced_labels(3, 7)
    assert labels.dtype == torch.long
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    for n in range(1, 8):
        counts = torch.bincount(labels[:n], minlength=3)
        assert counts.max() - counts.min() <= 1


def test_balanced_labels_offset_continues_the_sequence():
    whole = balanced_labels(4, 10)
    assert torch.equal(torch.cat([balanced_labels(4, 3), balanced_labels(4, 7, offset=3)]), whole)


# ----------------------------------------------------------------------------- settings, generate


def test_settings_defaults_are_the_default_runs_sampler_and_bad_values_are_refused():
    d = SamplerSettings().to_dict()
    assert d == dict(steps=20, order=2, method="multistep", algorithm="dpmsolver++", skip_type="logSNR",
                     t_end=1e-3, guidance_scale=1.0, precision="fp32", compile="none", mode_guidance=0.0,
                     mode_guidance_stop=0.5, modes_per_class=10)
    with pytest.raises(DiffdistillError, match="precision"):
        SamplerSettings(precision="fp16")
    with pytest.raises(DiffdistillError, match="steps"):
        SamplerSettings(steps=0)


def test_generate_shape_dtype_and_determinism(tiny):
    labels = torch.tensor([0, 1, 2, 1])
    settings = SamplerSettings(**FAST)
    a = generate(tiny, labels, settings, device="cpu", seed=5)
    b = generate(tiny, labels, settings, device="cpu", generator=torch.Generator().manual_seed(5))
    c = generate(tiny, labels, settings, device="cpu", seed=6)
    assert a.shape == (4, 3, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


class NaNAfter(torch.nn.Module):
    """A U-ViT whose noise prediction turns NaN: what a miscompiled network gives."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.null_label = model, model.config, model.null_label

    def forward(self, x, t, y=None):
        return self.model(x, t, y) * float("nan")


def test_a_batch_with_non_finite_values_is_refused_not_turned_into_pixels(tiny):
    with pytest.raises(DiffdistillError, match="non-finite values .* batch of 3 images"):
        generate(NaNAfter(tiny), torch.tensor([0, 1, 2]), SamplerSettings(**FAST), device="cpu", seed=0)


def test_generate_guided_and_bf16_run_and_guidance_needs_a_null_class(tiny):
    labels = torch.tensor([0, 2])
    out = generate(tiny, labels, SamplerSettings(**FAST, guidance_scale=2.0, precision="bf16"), device="cpu", seed=1)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.uint8
    no_null = uvit.build("uvit_tiny_test", num_classes=3, null_class=False).eval()
    with pytest.raises(DiffdistillError, match="guidance"):
        generate(no_null, labels, SamplerSettings(**FAST, guidance_scale=2.0), device="cpu", seed=1)


class GaussianOracle(torch.nn.Module):
    """Optimal noise predictor for x0 ~ N(mu, s^2) per pixel (docs/reference.md, "Gaussian oracle")."""

    def __init__(self, mu, s, channels=3, side=8):
        super().__init__()
        self.mu, self.s = mu, s
        self.config = {"in_chans": channels, "img_size": side}

    @staticmethod
    def alpha_sigma(t):
        alpha = torch.exp(-(0.1 * t + 9.95 * t**2) / 2)
        return alpha, torch.sqrt(1 - alpha**2)

    def forward(self, x, timesteps, y):
        t = (timesteps / 999.0).double().view(-1, 1, 1, 1)
        alpha, sigma = self.alpha_sigma(t)
        eps = sigma * (x.double() - alpha * self.mu) / (alpha**2 * self.s**2 + sigma**2)
        return eps.to(x.dtype)


def test_generate_matches_the_exact_probability_flow_solution():
    """U-ViT's 50-NFE sampler (singlestep order 3) follows the closed-form ODE solution."""
    mu, s = 0.2, 0.3
    model = GaussianOracle(mu, s)
    settings = SamplerSettings(**UVIT_SAMPLER)
    out = generate(model, torch.tensor([0, 1, 2, 0]), settings, device="cpu", seed=3)
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)).double()
    alpha, sigma = GaussianOracle.alpha_sigma(torch.tensor([1.0, settings.t_end], dtype=torch.float64))
    z = (x_T - alpha[0] * mu) / torch.sqrt(alpha[0] ** 2 * s**2 + sigma[0] ** 2)
    x_end = alpha[1] * mu + torch.sqrt(alpha[1] ** 2 * s**2 + sigma[1] ** 2) * z
    expected = ((x_end + 1) * 127.5).round().clamp(0, 255)
    assert (out.double() - expected).abs().max() <= 1.0


# ----------------------------------------------------------------------------- budget


def test_budget_stops_before_overrunning_and_keeps_finished_batches(monkeypatch):
    seen = []
    result, calls = budgeted_on_fakes(monkeypatch, [1.0], 3, budget_s=3.5, batch_size=4,
                                      on_batch=lambda im, lab: seen.append(lab.tolist()))
    assert len(calls) == 3 and len(result.batches) == 3
    assert len(result) == 12 and result.images.shape == (12, 3, 8, 8) and result.images.dtype == torch.uint8
    assert result.labels.tolist() == balanced_labels(3, 12).tolist()
    assert result.counts == [4, 4, 4]
    assert seen == [balanced_labels(3, 4, offset=4 * i).tolist() for i in range(3)]
    assert [b.seconds for b in result.batches] == [1.0, 1.0, 1.0]
    assert result.sampling_s == pytest.approx(3.0)
    assert result.images_per_s == pytest.approx(4.0)
    assert result.batch_size_final == 4


def test_budget_exactly_filled_and_warmup_batch_left_out_of_the_estimate(monkeypatch):
    # The first batch is slow (compilation); later ones cost 1 s. After it, only the warm batches
    # predict the next: batches end at 5, 6, ..., 12 and a 9th would end at 13 > 12.
    result, calls = budgeted_on_fakes(monkeypatch, [5.0, 1.0], 5, budget_s=12.0, batch_size=5)
    assert len(calls) == 8
    assert result.sampling_s <= 12.0
    assert result.counts == [8] * 5


def test_a_batch_ending_past_the_budget_is_dropped_not_kept(monkeypatch):
    # The estimate from warm batches (1 s) lets a 4th batch start at 3 s; it takes 2 s and ends at
    # 5 s > 4.5 s: its images were not made within the budget.
    result, calls = budgeted_on_fakes(monkeypatch, [1.0, 1.0, 1.0, 2.0], 3, budget_s=4.5, batch_size=3)
    assert len(calls) == 4 and len(result) == 9 and result.dropped_images == 3
    run = result.shard_run(shard=0, seed=0, load_s=0.0, device_name="cpu")
    assert result.sampling_s == pytest.approx(3.0) and run.dropped_images == 3 and run.images == 9


def test_budget_prefix_holds_only_images_whose_batch_finished_inside_its_time(monkeypatch):
    # Batches of 3 end at 2, 3, 4 and 6 s (the last past the 5.5 s budget: dropped, not in the pool).
    result, _ = budgeted_on_fakes(monkeypatch, [2.0, 1.0, 1.0, 2.0], 3, budget_s=5.5, batch_size=3)
    assert [b.end_s for b in result.batches] == [2.0, 3.0, 4.0, 6.0] and len(result) == 9
    summary = SamplingSummary(sampling_job(5.5), ["a", "b", "c"],
                              [result.shard_run(shard=0, seed=0, load_s=0.0, device_name="cpu")], environment=ENV)
    assert summary.finished_within(1.9) == [] and summary.finished_within(2.0) == [0, 1, 2]
    assert summary.finished_within(3.5) == list(range(6)) and summary.finished_within(100.0) == list(range(9))
    assert summary.budget_prefix(0.5) == (2.75, [0, 1, 2])
    assert summary.budget_prefix(1.0) == (5.5, list(range(9)))  # the dropped batch never counts
    with pytest.raises(DiffdistillError, match=r"in \(0, 1\]"):
        summary.budget_prefix(0.0)


def test_budget_prefix_of_merged_shards_takes_each_shard_by_its_own_clock():
    def shard(index, ends):
        batches = [BatchTime(size=2, seconds=1.0, end_s=end) for end in ends]
        return SamplingSummary(sampling_job(4.0), ["a", "b"], [ShardRun(
            shard=index, seed=index, counts=[len(ends), len(ends)], sampling_s=ends[-1], load_s=0.0,
            device_name="cpu", batches=batches)], environment=ENV)

    merged = SamplingSummary.merge([shard(0, [1.0, 2.0, 3.0]), shard(1, [1.5, 3.5])], environment=ENV)
    assert merged.finished_within(2.0) == [0, 1, 2, 3, 6, 7]  # shard 1's images start at position 6
    old = {**merged.to_json(), "shards": [{**merged.to_json()["shards"][0], "batches": [{"size": 6, "seconds": 3.0}]}]}
    with pytest.raises(DiffdistillError, match=r"old.json: field 'shards\[0\].batches\[0\].end_s' missing"):
        SamplingSummary.from_json(old, "old.json")  # a summary from before finish times were kept


def test_a_first_batch_longer_than_the_budget_is_an_error(monkeypatch):
    with pytest.raises(DiffdistillError, match="no batch finished within"):
        budgeted_on_fakes(monkeypatch, [10.0], 3, budget_s=5.0, batch_size=3)


def test_shards_start_their_class_cycles_apart_and_merge_balanced(monkeypatch):
    counts = torch.zeros(10, dtype=torch.long)
    for shard in range(3):
        offset = sampling.shard_label_offset(shard, 3, 10)
        result, _ = budgeted_on_fakes(monkeypatch, [1.0], 10, budget_s=1.5, batch_size=4, seed=shard,
                                      label_offset=offset)
        assert result.labels.tolist() == [(offset + i) % 10 for i in range(4)]
        counts += torch.bincount(result.labels, minlength=10)
    assert counts.max() - counts.min() <= 1  # 12 images over 10 classes: 2 classes twice


def shard_summary(shard, counts, sampling_s, budget_s=10.0):
    run = ShardRun(shard=shard, seed=4 + shard, counts=counts, sampling_s=sampling_s, load_s=0.5 + shard,
                   device_name=f"gpu{shard}")
    return SamplingSummary(sampling_job(budget_s, steps=20), ["a", "b"], [run],
                           environment=ENV)


def test_sampling_summary_merge_adds_up_images_and_throughput_and_keeps_each_shard():
    merged = SamplingSummary.merge([shard_summary(0, [20, 20], 10.0), shard_summary(1, [15, 15], 10.0)],
                                   environment=ENV, sources=["s0.pt", "s1.pt"])
    assert (merged.images, merged.counts, merged.images_per_s) == (70, [35, 35], 7.0)
    assert merged.images_per_s_per_shard == [4.0, 3.0] and [s.seed for s in merged.shards] == [4, 5]
    assert (merged.sampling_s, merged.load_s, merged.budget_s) == (10.0, 1.5, 10.0)
    assert merged.device_name == "gpu0, gpu1"
    with pytest.raises(DiffdistillError, match=r"settings \['budget_s'\] differ"):
        SamplingSummary.merge([shard_summary(0, [1, 1], 1.0), shard_summary(1, [1, 1], 1.0, budget_s=20.0)],
                              environment=ENV)


def test_sampling_summary_json_round_trip_stores_nothing_twice(tmp_path):
    single = shard_summary(0, [3, 2], 2.5)
    single.write(tmp_path / "pool.json")
    doc = json.loads((tmp_path / "pool.json").read_text())
    assert set(doc) == {"format", "version", "settings", "classes", "shards", "sources", "environment"}
    assert set(doc["shards"][0]).isdisjoint(doc["settings"])  # budget_s lives in settings only
    assert doc["settings"]["sampler"] == SamplerSettings(steps=20).to_dict()
    back = SamplingSummary.read(tmp_path / "pool.json")
    assert back == single and back.images == 5 and back.images_per_s == 2.0
    doc["shards"][0].pop("counts")
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(DiffdistillError, match=r"bad.json: field 'shards\[0\].counts' missing \(expected a list"):
        SamplingSummary.read(tmp_path / "bad.json")
    with pytest.raises(DiffdistillError, match="old.json: field 'format' is None, .*a sampling summary"):
        SamplingSummary.from_json({"images": 5}, "old.json")
    for change, expected in (({"version": 1}, "field 'version' is 1, expected 2"),
                             ({"settings": {**doc["settings"], "sampler": {"steps": 0}}},
                              r"field 'settings.sampler': sampler settings: steps must be >= 1, got 0"),
                             ({"settings": {**doc["settings"], "steps": 3}}, r"unknown fields \['settings.steps'\]"),
                             ({"classes": "ab"}, "field 'classes' is str 'ab', expected a list")):
        with pytest.raises(DiffdistillError, match=f"new.json: {expected}"):
            SamplingSummary.from_json({**single.to_json(), **change}, "new.json")


def test_budget_zero_or_negative_samples_nothing(monkeypatch):
    clock = FakeClock()
    run, calls = fake_generate(clock, [1.0])
    monkeypatch.setattr(sampling, "generate", run)
    for budget in (0, -1.0):
        with pytest.raises(DiffdistillError, match="budget"):
            sample_budgeted(object(), 3, SamplerSettings(), budget_s=budget, batch_size=4, device="cpu", seed=0,
                            clock=clock)
    assert calls == []



def test_budget_with_the_real_model_and_max_images(tiny):
    clock = FakeClock()
    result = sample_budgeted(tiny, 3, SamplerSettings(**FAST), budget_s=math.inf, batch_size=3, device="cpu",
                             seed=0, clock=clock, max_images=7)
    assert [b.size for b in result.batches] == [3, 3, 1]
    assert result.counts == [3, 2, 2]
    assert result.images.shape == (7, 3, 8, 8) and result.images.dtype == torch.uint8


# ----------------------------------------------------------------------------- out of memory


class OOMAbove(torch.nn.Module):
    """Wraps a U-ViT; raises an out-of-memory error for forward batches larger than ``limit``."""

    def __init__(self, inner, limit, error=torch.cuda.OutOfMemoryError):
        super().__init__()
        self.inner, self.limit, self.error = inner, limit, error
        self.config, self.null_label = inner.config, inner.null_label
        self.sizes = []

    def forward(self, x, timesteps, y):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x, timesteps, y)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, RuntimeError])
def test_out_of_memory_halves_the_batch_and_redoes_the_same_labels(tiny, error):
    model = OOMAbove(tiny, limit=2, error=error)
    result = sample_budgeted(model, 3, SamplerSettings(**FAST), budget_s=math.inf, batch_size=8, device="cpu",
                             seed=0, clock=FakeClock(), max_images=16)
    assert result.batch_size_final == 2
    assert len(result) == 16 and result.labels.tolist() == balanced_labels(3, 16).tolist()
    # the failed batch of 8 is redone in pieces of 2; the batches after it are of the working size
    assert [b.size for b in result.batches] == [8, 2, 2, 2, 2]
    assert model.sizes[:2] == [8, 4] and max(model.sizes[2:]) == 2


def test_out_of_memory_at_batch_one_is_an_error_and_other_errors_pass_through(tiny):
    with pytest.raises(DiffdistillError, match="batch size 1"):
        sample_budgeted(OOMAbove(tiny, limit=0), 3, SamplerSettings(**FAST), budget_s=10.0, batch_size=4,
                        device="cpu", seed=0, clock=FakeClock())
    with pytest.raises(ValueError, match="out of memory"):  # a ValueError is not an OOM
        sample_budgeted(OOMAbove(tiny, limit=0, error=ValueError), 3, SamplerSettings(**FAST), budget_s=10.0,
                        batch_size=4, device="cpu", seed=0, clock=FakeClock())


# ----------------------------------------------------------------------------- mode guidance

GUIDED = dict(mode_guidance=0.5, mode_guidance_stop=0.5, modes_per_class=2)


@pytest.mark.parametrize("key, value", [("mode_guidance", -0.1), ("mode_guidance", 1.5), ("mode_guidance_stop", -0.5),
                                        ("mode_guidance_stop", 1.01), ("modes_per_class", 0)])
def test_bad_mode_guidance_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(DiffdistillError, match=rf"sampler settings: {key} must be"):
        SamplerSettings(**{key: value})


@pytest.mark.parametrize("stop, steps, guided", [(0.5, 20, 10), (0.3, 10, 3), (0.55, 20, 11), (0.0, 5, 0), (1.0, 7, 7)])
def test_guidance_acts_on_the_evaluations_before_the_stop(stop, steps, guided):
    assert SamplerSettings(steps=steps, mode_guidance_stop=stop).guided_evaluations == guided


def test_mode_guidance_calls_the_network_as_often_as_plain_sampling(tiny):
    labels = balanced_labels(3, 6)
    modes = torch.rand(3, 2, 3, 8, 8) * 2 - 1
    calls = {}
    for strength in (0.0, 0.5):
        counter = OOMAbove(tiny, limit=10**6)  # records one size per network call
        settings = SamplerSettings(**FAST, **{**GUIDED, "mode_guidance": strength, "mode_guidance_stop": 1.0})
        generate(counter, labels, settings, device="cpu", seed=0, mode_targets=sampling.mode_targets_of(modes, labels))
        calls[strength] = counter.sizes
    assert calls[0.0] == calls[0.5] == [6] * FAST["steps"]


def test_full_strength_guidance_to_the_end_makes_the_mode_itself(tiny):
    # Strength 1 with no stop replaces every x0 by the mode, so every step is the same first-order (DDIM)
    # step towards it: x_end = alpha_end mode + sigma_end / sigma_T (x_T - alpha_T mode), within
    # sigma_end (3e-3 at t_end 1e-4) times |x_T| of the mode, and far from the plain sample.
    labels = balanced_labels(3, 6)
    modes = torch.rand(3, 2, 3, 8, 8) * 2 - 1
    targets = sampling.mode_targets_of(modes, labels)
    solver = {**FAST, "t_end": 1e-4}
    settings = SamplerSettings(**solver, mode_guidance=1.0, mode_guidance_stop=1.0)
    images = generate(tiny, labels, settings, device="cpu", seed=0, mode_targets=targets)
    assert (images.float() - from_model_range(targets).float()).abs().max() <= 4  # 4 of 255 levels
    plain = generate(tiny, labels, SamplerSettings(**solver), device="cpu", seed=0)
    assert (plain.float() - from_model_range(targets).float()).abs().mean() > 20


def test_mode_guidance_moves_samples_towards_their_modes_and_off_changes_nothing(tiny):
    labels = balanced_labels(3, 12)
    modes = torch.rand(3, 2, 3, 8, 8) * 2 - 1
    targets = sampling.mode_targets_of(modes, labels)
    plain = generate(tiny, labels, SamplerSettings(**FAST), device="cpu", seed=2)
    off = generate(tiny, labels, SamplerSettings(**FAST, **{**GUIDED, "mode_guidance": 0.0}), device="cpu", seed=2,
                   mode_targets=targets)
    assert torch.equal(plain, off)
    guided = generate(tiny, labels, SamplerSettings(**FAST, **GUIDED), device="cpu", seed=2, mode_targets=targets)
    distance = {name: (images.float() - from_model_range(targets).float()).abs().mean()
                for name, images in (("plain", plain), ("guided", guided))}
    assert distance["guided"] < distance["plain"]


def test_mode_guidance_without_modes_is_an_error_naming_the_key(tiny):
    with pytest.raises(DiffdistillError, match="mode_guidance 0.5 needs one mode per image"):
        generate(tiny, balanced_labels(3, 3), SamplerSettings(**FAST, **GUIDED), device="cpu", seed=0)


def test_budgeted_pool_takes_each_class_through_its_modes_in_turn(monkeypatch):
    # Mode j of class c is the constant image 10 c + j, so each image's target names its mode.
    modes = (10 * torch.arange(3).view(3, 1) + torch.arange(2)).float().view(3, 2, 1, 1, 1).expand(3, 2, 3, 8, 8)
    seen = []
    clock = FakeClock()

    def run(model, labels, settings, *, device, generator=None, seed=None, mode_targets=None):
        seen.append(mode_targets[:, 0, 0, 0].long())
        return torch.zeros(labels.shape[0], 3, 8, 8, dtype=torch.uint8)

    monkeypatch.setattr(sampling, "generate", run)
    result = sample_budgeted(object(), 3, SamplerSettings(**GUIDED), budget_s=math.inf, batch_size=4,
                             device="cpu", seed=0, clock=clock, max_images=12, modes=modes)
    target = torch.cat(seen)
    for label in range(3):
        assert target[result.labels == label].tolist() == [10 * label + i % 2 for i in range(4)]
