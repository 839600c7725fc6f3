"""pyco inside Hugging Face's Trainer and Lightning: pyco's optimizers passed where torch.optim's go, and the
callbacks that record every N-th step exactly without changing the training (tiny random models, no downloads)."""

import pytest
import torch
from torch import nn

import pyco
from pyco.probe import read_log


def check_log(entries, steps, loss=True):
    assert [e["step"] for e in entries] == steps
    for e in entries:
        assert e["actual"] == pytest.approx(sum(e["first_order"]) + e["second_order"] + e["remainder"], abs=1e-12)
        assert e["second_order"] == pytest.approx(e["within"] + e["cross"], abs=1e-12)
        assert len(e["C"]) == len(e["blocks"]) and (e["loss"] is not None) == loss


# ---- Hugging Face ---------------------------------------------------------------------------------------

def hf_run(tmp_path, optimizer: str, callback=None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 61, (24, 12), generator=gen)]
    opt = (pyco.optim.AdamW if optimizer == "pyco" else torch.optim.AdamW)(model.parameters(), lr=1e-3)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                          seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                                   callbacks=[callback] if callback else [])
    trainer.train()
    return model


def test_hf_trainer_takes_pyco_adamw_and_matches_torch(tmp_path):
    ours = hf_run(tmp_path / "a", "pyco")
    theirs = hf_run(tmp_path / "b", "torch")
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_hf_callback_records_without_changing_training(tmp_path):
    from pyco.integrations.huggingface import PycoCallback

    plain = hf_run(tmp_path / "a", "pyco")
    callback = PycoCallback(every=2)
    watched = hf_run(tmp_path / "b", "pyco", callback)
    for p, q in zip(watched.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    entries = read_log(tmp_path / "b" / "out" / "pyco")
    check_log(entries, [1, 3, 5], loss=False)  # the Trainer does not hand the step's loss to callbacks
    assert "transformer.wte" in entries[0]["blocks"] and "lm_head" not in entries[0]["blocks"]  # tied: first owner


# ---- Lightning ------------------------------------------------------------------------------------------

# Lightning's own warnings, not pyco's: its pytree use that torch deprecates, and its advice on loader workers.
lightning_warnings = [pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"),
                      pytest.mark.filterwarnings("ignore:The '.*dataloader' does not have many workers")]

def lightning_run(tmp_path, callback=None):
    L = pytest.importorskip("lightning")

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return pyco.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    module = Net()
    gen = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[callback] if callback else [])
    trainer.fit(module, loader)
    return module, trainer


@lightning_warnings[0]
@lightning_warnings[1]
def test_lightning_callback_records_without_changing_training(tmp_path):
    from pyco.integrations.lightning import PycoCallback

    plain, _ = lightning_run(tmp_path / "a")
    watched, trainer = lightning_run(tmp_path / "b", PycoCallback(every=2, out=tmp_path / "log"))
    for p, q in zip(watched.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    entries = read_log(tmp_path / "log")
    check_log(entries, [1, 3, 5])
    assert entries[0]["blocks"] == ["net.0", "net.2"]
    # the probe's re-evaluations logged nothing: the logged loss is the real last step's
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(entries[-1]["loss"])


def test_callbacks_refuse_bad_arguments():
    pytest.importorskip("lightning")
    from pyco.integrations.lightning import PycoCallback

    with pytest.raises(ValueError, match="every must be an int >= 1"):
        PycoCallback(every=0)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        PycoCallback(loss_fn=3)
