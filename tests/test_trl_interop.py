"""`rsd generate --format sft` output is what TRL expects: `datasets` loads it and SFTTrainer trains
on it (one step of a tiny student, on CPU), on exactly the tokens the student wrote and only those."""
import pytest
import torch
import trl  # in the test extra (pyproject.toml)

from rsd_engine.cli import main
from rsd_engine.pipeline.records import read_records
from solver_pair import SYSTEM, solver_pair, write_problems

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL's own default
def test_sft_output_trains_one_sftrainer_step(tmp_path_factory, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher, student = solver_pair(tmp_path_factory.getbasetemp() / "solver_pair")
    out = tmp_path / "sft.jsonl"
    assert main(["generate", "--teacher", str(teacher), "--student", str(student), "--data",
                 str(write_problems(tmp_path / "p.jsonl")), "--out", str(out), "--format", "sft",
                 "--system-prompt", SYSTEM, "--attempts", "1", "--max-new-tokens", "40", "--no-progress"]) == 0

    dataset = load_dataset("json", data_files=str(out), split="train")
    assert set(dataset.column_names) == {"id", "status", "question", "answer", "prompt", "completion", "input_ids",
                                         "completion_mask"}
    # Finished traces only: the prefixes of never-solved problems, which a chat template would close as
    # finished answers, are in the file beside.
    assert sorted(dataset["status"]) == ["solved", "unverified"]
    assert [r["status"] for r in read_records(tmp_path / "sft.unfinished.jsonl")] == ["prefix", "prefix"]
    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    config = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                           learning_rate=1e-3, use_cpu=True, report_to="none", save_strategy="no",
                           logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, max_length=128)
    tokenizer = AutoTokenizer.from_pretrained(str(student))
    trainer = trl.SFTTrainer(model=model, args=config, processing_class=tokenizer,
                             train_dataset=dataset.remove_columns(["id", "status", "question", "answer"]))
    for row, example in zip(dataset, trainer.train_dataset):
        # The sequence is the record's ids (prompt + completion); the loss is on the completion alone, which ends
        # with the EOS.
        ids, labels = example["input_ids"], example["labels"]
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert ids == row["input_ids"] and first == row["completion_mask"].index(1) and labels[first:] == ids[first:]
        assert tokenizer.decode(ids) == row["prompt"] + row["completion"]
        assert tokenizer.decode(ids[first:]) == row["completion"] and ids[-1] == tokenizer.eos_token_id
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))  # it learned something


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL's own default
def test_sftrainer_trains_on_the_tokens_written_where_the_text_tokenises_otherwise(tmp_path_factory, tmp_path):
    """A trace whose text tokenises into other ids than the student wrote ("answer" in pieces, a newline that
    merges with the prompt's last one): SFTTrainer takes the record's input_ids as they are, the loss on the
    completion's, where re-tokenising prompt + completion would have trained on other tokens."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rsd_engine.pipeline.prompts import build_prompt
    from rsd_engine.pipeline.traces import to_sft

    teacher, student = solver_pair(tmp_path_factory.getbasetemp() / "solver_pair")
    tokenizer = AutoTokenizer.from_pretrained(str(student))
    prompt = build_prompt(tokenizer, "What is two and two?", SYSTEM)
    prompt_ids = tokenizer.encode(prompt.text, add_special_tokens=False)
    pieces = [i for ch in "\nthe answer</think> \\boxed{4}" for i in tokenizer.encode(ch, add_special_tokens=False)]
    written = pieces + [tokenizer.eos_token_id]
    sft = to_sft({"id": "0", "status": "solved", "question": "q", "answer": "4"}, prompt, tokenizer, prompt_ids,
                 written)
    assert tokenizer.encode(sft["prompt"] + sft["completion"], add_special_tokens=False) != prompt_ids + written
    dataset = Dataset.from_list([sft]).remove_columns(["id", "status", "question", "answer"])
    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    config = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=1,
                           use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                           dataloader_num_workers=0, max_length=256)
    trainer = trl.SFTTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=dataset)
    example = trainer.train_dataset[0]
    assert example["input_ids"] == prompt_ids + written
    assert example["labels"] == [-100] * len(prompt_ids) + written
