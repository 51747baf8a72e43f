"""TRL's SFTTrainer training a qpeft model on a small text data set built here (a word-level tokenizer, no
downloads). TRL 1.16 replaces the forward of the model it is given with its fused LM head unless the model is peft's
own PeftModel, calling ``model.base_model`` as the backbone: so a QPeftModel hands TRL its transformers model
(``get_base_model()``), whose linear layers hold the adapters, as TRL does for peft's models itself."""

import pytest
import torch
from helpers import tiny_llama

import qpeft

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

WORDS = "the quick brown fox jumps over a lazy dog while cat sat on its warm mat".split()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.mark.parametrize("config", ["lora", "dora"])
def test_sft_trainer_trains_the_adapters_which_save_and_reload(config, tmp_path):
    tokenizer = word_tokenizer()
    data = datasets.Dataset.from_dict({"text": [" ".join(WORDS[i % 7 : i % 7 + 8]) for i in range(16)]})
    model = qpeft.get_peft_model(
        tiny_llama(), qpeft.LoraConfig(r=4, target_modules="all-linear", use_dora=config == "dora")
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        num_train_epochs=4,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=16,
        bf16=False,  # (its default on CPU: accelerate then leaves the model's forward autocast after training)
    )
    trainer = trl.SFTTrainer(model=model.get_base_model(), args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert sorted(moved) == sorted(before)  # every adapter tensor trained, nothing else
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    ids = tokenizer(["the lazy dog sat on a warm mat"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        back = qpeft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
        torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=0, atol=0)
