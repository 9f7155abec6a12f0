"""Fine-tuning jobs inside the serving engine: schedules, isolation between jobs and from serving,
agreement with PEFT, pause/resume/cancel, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from loramux import SLO, JobState, LoraConfig, SamplingParams, TrainingConfig
from loramux.datasets.reverse_words import reverse_words
from loramux.training.checkpoint import latest_checkpoint
from loramux.training.optim import learning_rate

LORA = LoraConfig(r=8, alpha=16, target_modules="all-linear")


def _run(engine, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not engine.has_work:
            return
        engine.step()
    raise AssertionError("the engine did not finish its work")


def _weights(adapter) -> dict:
    return {k: (A.detach().clone(), B.detach().clone()) for k, (A, B) in adapter.weights.items()}


def _assert_same_weights(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert (x - y).abs().max().item() <= tol, key


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        # after warm-up, transformers' schedules: step s of T gets (T - s) / (T - warmup) of the rate
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
        ("cosine", [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
    ],
)
def test_learning_rate_schedules(schedule, expected):
    config = TrainingConfig(learning_rate=1.0, lr_schedule=schedule, warmup_steps=2)
    got = [learning_rate(config, step, total_steps=6) for step in range(6)]
    assert got == pytest.approx(expected)


def test_data_order_is_a_seeded_permutation_per_epoch(tiny_engine):
    engine = tiny_engine()
    job = engine.create_job("a", reverse_words(10, seed=0), lora=LORA,
                            training=TrainingConfig(epochs=2, batch_size=4, seed=3))
    assert job.total_steps == 6  # ceil(10 / 4) per epoch
    epoch0 = job.batch_indices(0) + job.batch_indices(1) + job.batch_indices(2)
    epoch1 = job.batch_indices(3) + job.batch_indices(4) + job.batch_indices(5)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    assert job.batch_indices(0) == engine.create_job("b", reverse_words(10, seed=0), lora=LORA,
                                                     training=TrainingConfig(epochs=2, batch_size=4, seed=3)).batch_indices(0)


def test_two_jobs_together_equal_each_alone_and_serving_is_unchanged(tiny_engine):
    """Two jobs share every step (with each other and with requests of a third adapter); each ends
    with the weights it gets trained alone, and the served requests give the tokens they give
    without any training (fp32)."""
    data_x, data_y = reverse_words(24, seed=1), reverse_words(20, seed=2)
    cfg_x = TrainingConfig(epochs=2, batch_size=4, gradient_accumulation=2, learning_rate=1e-3, seed=11)
    cfg_y = TrainingConfig(epochs=2, batch_size=3, learning_rate=5e-4, lr_schedule="cosine", seed=12, max_grad_norm=None)
    lora_y = LoraConfig(r=4, alpha=4, target_modules=("q_proj", "v_proj"), use_rslora=True)
    prompts = ["Reverse: apple river stone\nAnswer:", "Hello there", "Count: 1 2 3"]

    def served(engine):
        return [g.token_ids for g in engine.generate(prompts, ["z", None, "z"], max_tokens=6, ignore_eos=True)]

    together = tiny_engine()
    together.create_adapter("z", LORA, seed=5, init_b="random")
    quiet = served(together)
    jx = together.create_job("x", data_x, lora=LORA, training=cfg_x)
    jy = together.create_job("y", data_y, lora=lora_y, training=cfg_y)
    requests = [together.add_request(p, a, SamplingParams(max_tokens=6, ignore_eos=True)) for p, a in zip(prompts, ["z", None, "z"])]
    mixed_steps = 0
    while together.has_work:
        together.step()
        mixed_steps += 1
    assert jx.state is jy.state is JobState.SUCCEEDED
    assert [r.output_ids for r in requests] == quiet
    assert served(together) == quiet

    for name, data, lora, cfg, job in (("x", data_x, LORA, cfg_x, jx), ("y", data_y, lora_y, cfg_y, jy)):
        alone = tiny_engine()
        solo = alone.create_job(name, data, lora=lora, training=cfg)
        _run(alone)
        assert solo.step == job.step
        _assert_same_weights(_weights(job.adapter), _weights(solo.adapter), tol=1e-5)
        assert not torch.allclose(job.adapter.weights[next(iter(job.adapter.weights))][1], torch.zeros(1))


def test_one_step_gradients_agree_with_peft(tiny_engine, default_tokenizer):
    """The LoRA gradients of one optimizer batch equal PEFT's for the same weights and batch:
    PEFT's loss is the mean token cross-entropy over the batch's completion tokens (labels -100 elsewhere)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from conftest import make_tiny_hf

    engine = tiny_engine(seed=7)
    records = reverse_words(6, seed=4)
    job = engine.create_job("g", records, lora=LORA,
                            training=TrainingConfig(max_steps=1, batch_size=6, max_grad_norm=None, learning_rate=1e-3))
    with torch.no_grad():  # non-zero B, so that A gets gradients too
        for A, B in job.adapter.weights.values():
            B.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    captured = {}

    def capture(*args, **kwargs):
        captured.update({k: (A.grad.clone(), B.grad.clone()) for k, (A, B) in job.adapter.weights.items()})

    job.optimizer.step = capture
    _run(engine)
    assert captured

    peft_model = get_peft_model(make_tiny_hf(seed=7, vocab_size=49152, tie_word_embeddings=True),
                                PeftLoraConfig(r=8, lora_alpha=16, target_modules=list(LORA.target_modules)))
    modules = dict(peft_model.named_modules())
    for (layer, name), (A, B) in job.adapter.weights.items():
        group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        module = modules[f"base_model.model.model.layers.{layer}.{group}.{name}"]
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(A)
            module.lora_B["default"].weight.copy_(B)
    eos = default_tokenizer.eos_token_id
    ids, labels = [], []
    for r in records:
        prompt = default_tokenizer(r["prompt"])["input_ids"]
        completion = default_tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [eos]
        ids.append(prompt + completion)
        labels.append([-100] * len(prompt) + completion)
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [eos] * (width - len(x)) for x in ids])
    label_t = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    peft_model.train()
    peft_model(input_ids=input_ids, attention_mask=attention, labels=label_t).loss.backward()
    for (layer, name), (gA, gB) in captured.items():
        group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        module = modules[f"base_model.model.model.layers.{layer}.{group}.{name}"]
        for ours, theirs in ((gA, module.lora_A["default"].weight.grad), (gB, module.lora_B["default"].weight.grad)):
            scale = theirs.abs().max().item()
            assert scale > 0
            assert (ours - theirs).abs().max().item() <= 1e-5 * scale + 1e-9, (layer, name)


def test_pause_resume_cancel(tiny_engine):
    engine = tiny_engine()
    job = engine.create_job("p", reverse_words(16, seed=0), lora=LORA, training=TrainingConfig(epochs=4, batch_size=4))
    for _ in range(3):
        engine.step()
    job.pause()
    step = job.step
    for _ in range(3):
        engine.step()
    assert job.step == step and job.state is JobState.PAUSED and not engine.has_work
    job.resume()
    engine.step()
    engine.step()
    assert job.step > step
    job.cancel()
    assert job.state is JobState.CANCELLED and not engine.has_work
    assert not any(t.requires_grad or t.grad is not None for t in job.adapter.parameters())
    assert [e.data.get("state") for e in job.events if "state" in e.data] == ["running", "paused", "running", "cancelled"]
    # the adapter stays servable with the weights it reached
    assert engine.generate(["Reverse: a b c\nAnswer:"], ["p"], max_tokens=3)[0].token_ids


def test_events_checkpoints_and_resume_continue_the_same_curve(tiny_engine, tmp_path):
    """A job stopped after its step-4 checkpoint and resumed in a new engine ends with the weights
    and the loss curve of an uninterrupted run."""
    data, val = reverse_words(24, seed=3), reverse_words(6, seed=4)
    cfg = TrainingConfig(epochs=2, batch_size=4, learning_rate=1e-3, eval_every=3, checkpoint_every=2, checkpoint_interval=0, seed=5)
    full_engine = tiny_engine()
    full = full_engine.create_job("r", data, val=val, lora=LORA, training=cfg, checkpoint_dir=tmp_path / "full")
    _run(full_engine)
    curve = [e.data["train_loss"] for e in full.events if "train_loss" in e.data]
    assert len(curve) == full.total_steps == 12
    assert [e.data["step"] for e in full.events if "eval_loss" in e.data] == [3, 6, 9, 12]
    assert all({"tokens_per_second", "eta_seconds", "learning_rate"} <= e.data.keys() for e in full.events if "train_loss" in e.data)

    first = tiny_engine()
    part = first.create_job("r", data, val=val, lora=LORA, training=cfg, checkpoint_dir=tmp_path / "cut")
    while part.step < 5:  # one step past the step-4 checkpoint: that work is lost
        first.step()
    first.trainer.writer.wait_all()  # the step-4 checkpoint is written off the step loop
    assert latest_checkpoint(tmp_path / "cut").name == "step-000004"
    second = tiny_engine()
    resumed = second.create_job("r", data, val=val, lora=LORA, training=cfg, checkpoint_dir=tmp_path / "cut")
    assert resumed.step == 4 and "resumed from" in resumed.events[0].message + resumed.events[-1].message
    _run(second)
    resumed_curve = [e.data["train_loss"] for e in resumed.events if "train_loss" in e.data]
    assert resumed_curve == pytest.approx(curve[4:], rel=1e-4)
    _assert_same_weights(_weights(resumed.adapter), _weights(full.adapter), tol=1e-5)
    # a checkpoint is a PEFT adapter: it loads as one
    second.load_adapter("from-ckpt", latest_checkpoint(tmp_path / "cut"))


@pytest.mark.parametrize("tpot, trains_beside_requests", [(1000.0, True), (1e-9, False)])
def test_training_takes_only_what_running_requests_can_afford(tiny_engine, tpot, trains_beside_requests):
    """Requests with time in hand (a TPOT target no step comes near) leave room for training rows
    in their steps; requests already late (a TPOT target every step misses) get steps without
    training, however long training has waited, and the job goes on once they are done."""
    engine = tiny_engine()
    job = engine.create_job("s", reverse_words(40, seed=0), lora=LORA, training=TrainingConfig(epochs=1, batch_size=2))
    slo = SLO(ttft=1000.0, tpot=tpot)
    requests = [engine.add_request("Hello", None, SamplingParams(max_tokens=8, ignore_eos=True), slo=slo) for _ in range(3)]
    tokens_beside_requests = 0
    while engine.has_unfinished:
        before, decoding = job.train_tokens, any(r.output_ids and r.id in engine.requests for r in requests)
        engine.step()
        if decoding:  # a request's next token is due in this step
            tokens_beside_requests += job.train_tokens - before
    assert (tokens_beside_requests > 0) == trains_beside_requests
    while job.step == 0:
        engine.step()
    assert job.train_tokens > 0
