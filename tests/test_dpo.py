"""Preference tuning (DPO) in the engine's steps: OpenAI's preference data, agreement with TRL's
DPOTrainer, a job that learns a preference while other adapters are served unchanged, pairs kept
whole within a step, checkpoint and resume, starting from an adapter, gradient isolation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_hf, ours_from_hf
from test_gradient_isolation import _saved_bytes
from test_training import _assert_same_weights, _run, _weights

from loramux import JobState, LoraConfig, SamplingParams, TrainingConfig
from loramux.batch import Batch, Chunk, RowKind
from loramux.lora.adapter import LoraAdapter
from loramux.lora.registry import AdapterRegistry
from loramux.training.checkpoint import latest_checkpoint
from loramux.training.data import DataError, parse_jsonl, tokenize, tokenize_pair

LORA = LoraConfig(r=8, alpha=16, target_modules="all-linear")
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "rocket", "garden", "silver"]


def pair(question: str, preferred: str, rejected: str) -> dict:
    return {"input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


def yes_no_pairs(words: list[str]) -> list[dict]:
    """A small preference task: whatever the word, the preferred reply is "yes", the other "no"."""
    return [pair(f"Is {w} a word?", "yes", "no") for w in words]


def _randomize_b(adapter, seed: int = 1) -> None:
    """Non-zero B, so that A gets gradients and the adapter differs from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, B in adapter.weights.values():
            B.normal_(0, 0.02, generator=g)


def _prompt_length(sample) -> int:
    return sample.loss_mask.index(True)


# --- data -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from loramux.model.loader import load_tokenizer, resolve_model_dir

    return load_tokenizer(resolve_model_dir(None)[1])


def test_pairs_are_tokenized_with_the_chat_template_and_mask_only_the_reply(tok):
    record = parse_jsonl([json.dumps(pair("Is it blue?", "Yes, it is.", "No."))])[0]
    p = tokenize_pair(record, tok, 2048)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Is it blue?"}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    for sample, reply in ((p.chosen, "Yes, it is."), (p.rejected, "No.")):
        n = _prompt_length(sample)
        assert list(sample.input_ids[:n]) == prompt_ids  # the prompt is the generation prompt, no BOS added
        assert not any(sample.loss_mask[:n]) and all(sample.loss_mask[n:])
        assert tok.decode(sample.input_ids[n:]) == reply + "<|im_end|>\n"  # the reply and its end of turn
    # the same masks as a supervised chat example of the same conversation (one code path)
    chat = tokenize(parse_jsonl([json.dumps({"messages": record["input"]["messages"] + record["preferred_output"]})])[0],
                    tok, tok.eos_token_id, 2048)
    assert chat == p.chosen


BAD_PAIRS = {
    "no input": ({"preferred_output": [{"role": "assistant", "content": "a"}],
                  "non_preferred_output": [{"role": "assistant", "content": "b"}]}, "'input' must be an object"),
    "input without messages": ({**pair("q", "a", "b"), "input": {"tools": []}}, "'input.messages' must be a non-empty list"),
    "bad message": ({**pair("q", "a", "b"), "input": {"messages": [{"role": "robot", "content": "q"}]}},
                    "input.messages[0] needs a 'role'"),
    "tools not a list": ({**pair("q", "a", "b"), "input": {"messages": [{"role": "user", "content": "q"}], "tools": "x"}},
                         "'input.tools' must be a list"),
    "parallel_tool_calls not bool": ({**pair("q", "a", "b"), "input": {"messages": [{"role": "user", "content": "q"}],
                                                                       "parallel_tool_calls": "yes"}}, "true or false"),
    "missing non_preferred": ({k: v for k, v in pair("q", "a", "b").items() if k != "non_preferred_output"},
                              "'non_preferred_output' must be a list of one assistant message"),
    "two replies": ({**pair("q", "a", "b"), "preferred_output": [{"role": "assistant", "content": "a"}] * 2},
                    "'preferred_output' must be a list of one"),
    "user reply": ({**pair("q", "a", "b"), "preferred_output": [{"role": "user", "content": "a"}]}, "assistant message"),
    "empty reply": (pair("q", "", "b"), "non-empty string 'content'"),
    "same replies": (pair("q", "same", "same"), "are the same reply"),
}


@pytest.mark.parametrize("name", BAD_PAIRS)
def test_bad_pairs_are_refused_naming_their_line(name, tiny_engine):
    bad, message = BAD_PAIRS[name]
    lines = [json.dumps(pair("q", "a", "b")), "", json.dumps(bad)]
    with pytest.raises(DataError, match=r"^line 3: ") as e:
        parse_jsonl(lines)
    assert message in str(e.value)
    engine = tiny_engine()
    with pytest.raises(DataError, match=r"^line 3: "):
        engine.create_job("x", [pair("q", "a", "b"), pair("q", "a", "b"), bad], training=TrainingConfig(method="dpo"))
    assert "x" not in engine.adapters and not engine.trainer.jobs


def test_each_method_refuses_the_other_methods_data(tiny_engine, tmp_path):
    engine = tiny_engine()
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(pair("q", "a", "b")) + "\n")
    with pytest.raises(DataError, match="^line 1: a preference pair .* use method 'dpo'"):
        engine.create_job("x", path)
    with pytest.raises(DataError, match="^line 2: method 'dpo' needs preference pairs"):
        engine.create_job("x", [pair("q", "a", "b"), {"prompt": "a", "completion": "b"}], training=TrainingConfig(method="dpo"))
    # a pair and its reference rows run in one step: both replies together within half of micro_batch_tokens
    with pytest.raises(DataError, match="^line 1: the pair has .* more than the limit of 20"):
        engine.create_job("x", path, training=TrainingConfig(method="dpo", micro_batch_tokens=40))
    assert not engine.trainer.jobs and "x" not in engine.adapters


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_beta_must_be_positive(beta):
    with pytest.raises(ValueError, match="beta must be positive"):
        TrainingConfig(method="dpo", beta=beta)
    with pytest.raises(ValueError, match="method must be one of"):
        TrainingConfig(method="ppo")


# --- agreement with TRL -----------------------------------------------------------------------

@pytest.mark.parametrize("reference", ["base", "starting adapter"])
def test_one_step_loss_and_gradients_agree_with_trl(tiny_engine, default_tokenizer, tmp_path, reference):
    """One optimizer batch of three pairs: our DPO loss, LoRA gradients and reward metrics equal TRL's
    DPOTrainer with PEFT and ref_model=None (sigmoid loss on sums of the reply tokens'
    log-probabilities, mean over pairs), fp32, within 1e-5. reference "base": a new adapter, whose
    reference is the base model (TRL: peft_config given, the adapter disabled); "starting adapter":
    a job made with init_from, whose reference is the adapter it starts from (TRL: a PEFT model with
    a trained adapter, copied to a frozen "ref" adapter)."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from trl import DPOConfig, DPOTrainer

    records = [pair("Is the sky blue?", "Yes, it is.", "No, it is green."),
               pair("Name a fruit.", "An apple.", "A chair, I think."),
               pair("What is 2+2?", "4", "It is probably 5 or so.")]
    engine = tiny_engine(seed=7)
    training = TrainingConfig(method="dpo", beta=0.3, max_steps=1, batch_size=3, max_grad_norm=None, learning_rate=1e-3)
    if reference == "base":
        job = engine.create_job("d", records, lora=LORA, training=training)
        _randomize_b(job.adapter)
    else:
        _randomize_b(engine.create_adapter("start", LORA, seed=3))
        job = engine.create_job("d", records, init_from="start", training=training)
        assert job.reference is engine.adapters.get("start")
    captured = {}

    def capture(*args, **kwargs):
        captured.update({k: (A.grad.clone(), B.grad.clone()) for k, (A, B) in job.adapter.weights.items()})

    job.optimizer.step = capture
    _run(engine)
    assert captured and job.state is JobState.SUCCEEDED

    hf = make_tiny_hf(seed=7, vocab_size=49152, tie_word_embeddings=True)
    peft_config = PeftLoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA.target_modules))

    def copy_weights(model):
        modules = dict(model.named_modules())
        with torch.no_grad():  # the job's weights before its step (the captured step did not change them)
            for (layer, name), (A, B) in job.adapter.weights.items():
                modules[_peft_name(layer, name)].lora_A["default"].weight.copy_(A)
                modules[_peft_name(layer, name)].lora_B["default"].weight.copy_(B)

    dataset = Dataset.from_list([{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
                                  "rejected": r["non_preferred_output"]} for r in records])
    args = DPOConfig(output_dir=str(tmp_path), beta=0.3, per_device_train_batch_size=3, precompute_ref_log_probs=False,
                     max_length=None, report_to="none", use_cpu=True, dataloader_num_workers=0)
    if reference == "base":
        trainer = DPOTrainer(model=hf, args=args, train_dataset=dataset, processing_class=default_tokenizer, peft_config=peft_config)
        copy_weights(trainer.model)
    else:
        peft_model = get_peft_model(hf, peft_config)
        copy_weights(peft_model)
        trainer = DPOTrainer(model=peft_model, ref_model=None, args=args, train_dataset=dataset, processing_class=default_tokenizer)
        assert "ref" in trainer.model.peft_config
    # TRL tokenizes the conversations to the same prompt and reply ids
    ours = []
    for p in engine.load_data(records, 2048, "dpo"):
        n = _prompt_length(p.chosen)
        assert p.chosen.input_ids[:n] == p.rejected.input_ids[:n]
        ours.append({"prompt_ids": list(p.chosen.input_ids[:n]), "chosen_ids": list(p.chosen.input_ids[n:]),
                     "rejected_ids": list(p.rejected.input_ids[n:])})
    theirs = [{k: list(trainer.train_dataset[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(3)]
    assert theirs == ours
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(ours))
    loss.backward()
    assert job.last_train_loss == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    modules = dict(trainer.model.named_modules())
    for (layer, name), (gA, gB) in captured.items():
        m = modules[_peft_name(layer, name)]
        for mine, trl in ((gA, m.lora_A["default"].weight.grad), (gB, m.lora_B["default"].weight.grad)):
            scale = trl.abs().max().item()
            assert scale > 0
            assert (mine - trl).abs().max().item() <= 1e-5 * scale + 1e-9, (layer, name)
    # rewards are beta x differences of fp32 sums of ~50 in size: equal to a few 1e-6
    logged = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert job.last_metrics[name] == pytest.approx(logged[name], abs=1e-5), name
    if reference == "base":  # (from the starting adapter, chosen and rejected rewards are both 0: no accuracy yet)
        assert job.last_metrics["rewards/accuracies"] == pytest.approx(logged["rewards/accuracies"])
    assert all(name in job.events[-2].data for name in logged if name.startswith("rewards/"))  # the step's event


def _peft_name(layer: int, name: str) -> str:
    group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{group}.{name}"


# --- jobs in the engine -----------------------------------------------------------------------

def _reply_logp(engine, adapter: str | None, sample) -> float:
    """log p(reply | prompt) of a tokenized pair side, under `adapter` (None: the base model)."""
    chunk = Chunk(sample.input_ids, RowKind.EVAL, engine.adapters.slot(adapter))
    with torch.no_grad():
        logits = engine.model.logits(engine.model(Batch.build([chunk])))
    logp = torch.log_softmax(logits.double(), -1)
    return sum(logp[t, sample.input_ids[t + 1]].item() for t in range(len(sample) - 1) if sample.loss_mask[t + 1])


def _margins(engine, adapter: str | None, pairs) -> list[float]:
    return [_reply_logp(engine, adapter, p.chosen) - _reply_logp(engine, adapter, p.rejected) for p in pairs]


def test_a_dpo_job_learns_the_preference_while_other_adapters_are_served_unchanged(tiny_engine):
    """Trained on "yes" over "no" for eight words, the adapter prefers "yes" more than the base model
    does for four other words; requests on another adapter and the base model, served in the same
    steps, give the tokens they give with no training (greedy, fp32). Every step carries whole pairs:
    as many reference rows as adapter rows."""
    engine = tiny_engine()
    engine.create_adapter("z", LORA, seed=5, init_b="random")
    prompts, users = ["Hello there", "Is apple a word?", "Count: 1 2 3"], ["z", None, "z"]

    def served():
        return [g.token_ids for g in engine.generate(prompts, users, max_tokens=6, ignore_eos=True)]

    quiet = served()
    held_out = engine.load_data(yes_no_pairs(WORDS[8:]), 2048, "dpo")
    base_margins = _margins(engine, None, held_out)
    job = engine.create_job("pref", yes_no_pairs(WORDS[:8]), val=yes_no_pairs(WORDS[8:]), lora=LORA,
                            training=TrainingConfig(method="dpo", beta=0.1, epochs=4, batch_size=4, learning_rate=5e-3))
    requests = [engine.add_request(p, a, SamplingParams(max_tokens=6, ignore_eos=True)) for p, a in zip(prompts, users)]
    while engine.has_work:
        engine.step()
        rows = engine.last_step.rows if engine.last_step else {}
        if rows.get("train"):  # (training and evaluation never share a step of one job)
            assert rows["train"] == rows["eval"]
    assert job.state is JobState.SUCCEEDED, job.error
    assert [r.output_ids for r in requests] == quiet
    assert served() == quiet
    trained = _margins(engine, "pref", held_out)
    assert all(t > b + 1.0 for t, b in zip(trained, base_margins)), (trained, base_margins)
    metrics = [e.data for e in job.events if "train_loss" in e.data]
    assert len(metrics) == job.total_steps == 8
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= metrics[-1].keys()
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] and metrics[-1]["rewards/margins"] > 0
    assert job.last_eval_loss is not None and job.last_eval_loss < 0.6931  # below log 2: the held-out pairs agree
    assert job.last_metrics["eval_rewards/accuracies"] == 1.0


def test_a_pair_is_handed_out_whole_or_not_at_all(tiny_engine):
    """A pair's four sequences (its chosen and rejected replies, with the adapter and with the
    reference) come as one work item, within one step's budget, or wait for a later step."""
    engine = tiny_engine()
    job = engine.create_job("p", yes_no_pairs(WORDS[:4]), lora=LORA, training=TrainingConfig(method="dpo", batch_size=4))
    first = job.train[job.batch_indices(0)[0]]
    rows = 2 * len(first)
    assert job.take(rows - 1) == []
    [item] = job.take(rows)
    assert item.num_rows == rows and item.example is first
    assert [(s.sample, s.kind, s.adapter) for s in item.sequences] == [
        (first.chosen, RowKind.TRAIN, job.adapter), (first.rejected, RowKind.TRAIN, job.adapter),
        (first.chosen, RowKind.EVAL, None), (first.rejected, RowKind.EVAL, None)]


def test_checkpoint_and_resume_of_a_dpo_job_from_a_starting_adapter(tiny_engine, tmp_path):
    """A DPO job started from an adapter (its reference), stopped after its step-2 checkpoint and
    resumed in a new engine, ends with the weights and the loss curve of an uninterrupted run; the
    starting adapter is never changed."""
    data = yes_no_pairs(WORDS)
    cfg = TrainingConfig(method="dpo", beta=0.2, epochs=2, batch_size=3, learning_rate=2e-3, checkpoint_every=2,
                         checkpoint_interval=0, seed=4)

    def start(engine):
        engine.create_adapter("start", LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")),
                              seed=9, init_b="random")
        return _weights(engine.adapters.get("start"))

    full_engine = tiny_engine()
    before = start(full_engine)
    full = full_engine.create_job("d", data, init_from="start", training=cfg, checkpoint_dir=tmp_path / "full")
    assert full.adapter.config == full_engine.adapters.get("start").config
    _run(full_engine)
    _assert_same_weights(_weights(full_engine.adapters.get("start")), before, tol=0.0)
    curve = [e.data["train_loss"] for e in full.events if "train_loss" in e.data]
    assert len(curve) == full.total_steps == 8 and curve[0] == pytest.approx(0.6931471805599453)

    first = tiny_engine()
    start(first)
    part = first.create_job("d", data, init_from="start", training=cfg, checkpoint_dir=tmp_path / "cut")
    while part.step < 3:  # one step past the step-2 checkpoint: that work is lost
        first.step()
    first.trainer.writer.wait_all()
    assert latest_checkpoint(tmp_path / "cut").name == "step-000002"
    second = tiny_engine()
    start(second)
    resumed = second.create_job("d", data, init_from="start", training=cfg, checkpoint_dir=tmp_path / "cut")
    assert resumed.step == 2
    _run(second)
    assert [e.data["train_loss"] for e in resumed.events if "train_loss" in e.data] == pytest.approx(curve[2:], rel=1e-4)
    _assert_same_weights(_weights(resumed.adapter), _weights(full.adapter), tol=1e-5)


def test_starting_adapters_and_references_are_guarded(tiny_engine):
    engine = tiny_engine()
    engine.create_adapter("start", LORA, seed=1, init_b="random")
    dpo = TrainingConfig(method="dpo")
    with pytest.raises(ValueError, match="give it as init_from"):
        engine.create_job("start", yes_no_pairs(WORDS[:2]), training=dpo)
    with pytest.raises(ValueError, match="takes its LoRA config"):
        engine.create_job("new", yes_no_pairs(WORDS[:2]), lora=LORA, init_from="start", training=dpo)
    with pytest.raises(LookupError, match="unknown adapter 'nope'"):
        engine.create_job("new", yes_no_pairs(WORDS[:2]), init_from="nope", training=dpo)
    assert engine.adapters.names() == ["start"]
    job = engine.create_job("new", yes_no_pairs(WORDS[:2]), init_from="start", training=dpo)
    with pytest.raises(ValueError, match="is the reference of a DPO job"):
        engine.unload_adapter("start")
    with pytest.raises(ValueError, match="is the reference of job"):
        engine.create_job("start", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match="job .* is training it"):
        engine.create_job("newer", yes_no_pairs(WORDS[:2]), init_from="new", training=dpo)
    # a supervised job may start from an adapter too: a copy, trained; the original stays as it was
    sft = engine.create_job("sft", [{"prompt": "a", "completion": "b"}], init_from="start")
    assert sft.reference is None and sft.adapter is not engine.adapters.get("start")
    job.cancel()
    engine.unload_adapter("start")


# --- gradient isolation -----------------------------------------------------------------------

def _model_with(names):
    model = ours_from_hf(make_tiny_hf(seed=0))
    registry = AdapterRegistry(model)
    g = torch.Generator().manual_seed(0)
    adapters = {n: LoraAdapter.create(n, LORA, model.config, generator=g, init_b="random") for n in names}
    for a in adapters.values():
        registry.add(a)
        a.requires_grad_(True)  # all of them: only the row layout may keep gradients away
    return model, registry, adapters


def test_reference_rows_and_other_adapters_get_no_gradient_and_save_nothing():
    """A DPO step's batch (the policy's TRAIN rows of X; the same sequences as reference rows of the
    starting adapter R and of the base; Z's rows served beside): gradients reach X alone, and the
    step saves exactly the bytes of X's TRAIN rows alone."""
    from loramux.training.objectives import DirectPreference

    model, registry, adapters = _model_with(("X", "R", "Z"))
    g = torch.Generator().manual_seed(1)
    chosen, rejected, other = (torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 7, 6))

    def step(with_reference: bool):
        chunks = [Chunk(chosen, RowKind.TRAIN, registry.slot("X")), Chunk(rejected, RowKind.TRAIN, registry.slot("X"))]
        if with_reference:
            chunks += [Chunk(s, RowKind.EVAL, registry.slot(r)) for r in ("R", None) for s in (chosen, rejected)]
            chunks += [Chunk(other, RowKind.EVAL, registry.slot("Z"))]
        batch = Batch.build(chunks)
        hidden = model(batch)

        def logp(i):  # as the trainer does: logits of the sequence's rows only
            rows = batch.chunk_rows[i]
            ids = chunks[i].token_ids
            lp = torch.log_softmax(model.logits(hidden[rows.start : rows.stop - 1]), -1)
            return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()

        policy = [logp(0), logp(1)]
        with torch.no_grad():
            refs = [logp(2), logp(3)] if with_reference else [p.detach() for p in policy]
        loss, _ = DirectPreference(0.1).loss(torch.stack(policy + refs))
        return loss

    losses = {}
    saved = {with_reference: _saved_bytes(lambda w=with_reference: losses.__setitem__(w, step(w))) for with_reference in (False, True)}
    losses[True].backward()
    assert all(t.grad is not None for t in adapters["X"].parameters())
    assert all(t.grad is None for name in ("R", "Z") for t in adapters[name].parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert saved[True] == saved[False] > 0


# --- the CLI ----------------------------------------------------------------------------------

def test_cli_finetune_with_dpo_from_a_starting_adapter(tmp_path, default_tokenizer, capsys):
    """`loramux finetune --method dpo --beta B --adapter-init DIR` on a tiny model directory trains a
    copy of the starting adapter against it and writes the new adapter in PEFT's format."""
    from loramux.cli import main
    from loramux.engine.engine import Engine

    model_dir = tmp_path / "tiny"
    make_tiny_hf(seed=0, vocab_size=49152, tie_word_embeddings=True).save_pretrained(model_dir)
    default_tokenizer.save_pretrained(model_dir)
    engine = Engine.load(model_dir)
    engine.create_adapter("start", LORA, seed=2, init_b="random")
    engine.save_adapter("start", tmp_path / "start")
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in yes_no_pairs(WORDS[:4])) + "\n")
    assert main(["finetune", "--model", str(model_dir), "--method", "dpo", "--beta", "0.2", "--data", str(data),
                 "--name", "d", "--output-dir", str(tmp_path / "out"), "--adapter-init", str(tmp_path / "start"),
                 "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-3"]) == 0
    assert "adapter 'd' written" in capsys.readouterr().out
    trained = engine.read_adapter("trained", tmp_path / "out")
    assert trained.config == LORA
    assert any(not torch.equal(trained.weights[k][1], B) for k, (_, B) in engine.adapters.get("start").weights.items())
