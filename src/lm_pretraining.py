"""Text pre-training of the small Mamba LM: our stand-in for the pretrained Mamba-2.8B that stage 1 freezes.

The LM is the `lm` of a model YAML (hparams/model/tiny.yaml, demo.yaml), so its architecture is by construction
the one the stage YAMLs build. It learns next-token prediction with the project tokenizer (GPT-NeoX-20B + the
three added tokens, modules/tokenizer.py) on a text pool (src/text_pool.py): every line followed by
`<|endoftext|>`, concatenated and cut into blocks of `block_size` + 1 tokens.

An "epoch" is `blocks_per_epoch` blocks drawn without replacement (a new draw each epoch, reproducible after a
resume), so that the wall-clock budget (`max_minutes`, src/epochs.py) can stop between short epochs. After every
epoch that validates best so far, the weights are also exported as a Hugging Face folder (`export_folder`:
config.json + model.safetensors), which stage 1 loads with `--lm_source=<export_folder>`, exactly like
state-spaces/mamba-2.8b-hf.
"""
import logging
import pathlib

import speechbrain as sb
import torch
import torch.nn.functional as F
from speechbrain.dataio.sampler import ReproducibleRandomSampler
from speechbrain.utils.distributed import if_main_process, run_on_main

from src.brain import TrainingBrain
from src.stages import end_process_group, parse_run_arguments, start_experiment
from src.text_pool import build_text_pool

logger = logging.getLogger(__name__)
TOKEN_CACHE_VERSION = 1


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of `block_size + 1` ids of one token stream (inputs = block[:-1], targets = block[1:])."""

    def __init__(self, ids, block_size):
        self.ids, self.block_size = ids, block_size
        self.count = (ids.numel() - 1) // block_size
        if self.count < 1:
            raise ValueError(f"the text holds {ids.numel()} tokens, fewer than one block of {block_size + 1}; "
                             "give more text or a smaller block_size.")

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        start = index * self.block_size
        return self.ids[start: start + self.block_size + 1].long()  # (block_size + 1,)


def tokenize_text_file(text_file, tokenizer, cache_folder, chunk_lines=4096):
    """The file's lines, each + `<|endoftext|>`, as one int32 stream; cached by file size and mtime."""
    text_file = pathlib.Path(text_file)
    if not text_file.is_file():
        raise FileNotFoundError(f"{text_file}: text file not found; build a pool with `python -m src.text_pool --out "
                                "FOLDER` or set text_file / valid_text_file in the YAML.")
    stat = text_file.stat()
    key = {"version": TOKEN_CACHE_VERSION, "file": str(text_file.resolve()), "size": stat.st_size,
           "mtime": stat.st_mtime_ns, "vocab": len(tokenizer)}
    cache = pathlib.Path(cache_folder) / f"{text_file.stem}.tokens.pt"
    if cache.is_file():
        stored = torch.load(cache, weights_only=True)
        if stored["key"] == key:
            return stored["ids"]
    lines = [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{text_file}: the file holds no text (one text per line expected).")
    eos = tokenizer.eos_token_id
    stream = []
    for start in range(0, len(lines), chunk_lines):
        for ids in tokenizer(lines[start: start + chunk_lines], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
    ids = torch.tensor(stream, dtype=torch.int32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "ids": ids}, cache)
    logger.info("%s: %d lines -> %d tokens (cached in %s)", text_file, len(lines), ids.numel(), cache)
    return ids


def export_lm(lm, folder):
    """Write the LM as a Hugging Face folder (config.json + model.safetensors) that `MambaLM(source=...)` loads."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(str(folder), safe_serialization=True)
    return folder


class TokenLM(torch.nn.Module):
    """ids (B, L) -> logits (B, L, V) through `MambaLM` (embedding inside the forward, so DDP sees all of it)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(self.lm.embed(ids))  # (B, L, V)


class LMBrain(TrainingBrain):
    """Next-token training of `modules.lm.MambaLM`; YAML keys: `lm`, `noam_annealing`, `keep_checkpoints`,
    `export_folder`, `train_logger`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_losses = []

    def compute_forward(self, batch, stage):
        blocks = batch.to(self.device)  # (B, block_size + 1)
        return self.modules.lm(blocks[:, :-1])  # (B, block_size, V)

    def compute_objectives(self, logits, batch, stage):
        targets = batch.to(self.device)[:, 1:]  # (B, block_size)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        if stage != sb.Stage.TRAIN:
            self.correct += int((logits.argmax(-1) == targets).sum())
            self.total += targets.numel()
        return loss

    def on_stage_start(self, stage, epoch=None):
        if stage != sb.Stage.TRAIN:
            self.correct, self.total = 0, 0

    def best_valid_loss(self) -> float:
        """The lowest validation loss of the kept checkpoints (inf before the first).

        Why: the export is what stage 1 starts from, so it holds the best epoch, not the last. On the H200 the
        speedrun LM's validation loss was lowest at epoch 7 (PPL 142) and rose to PPL 2491 by epoch 26, the epoch
        that was exported until then; stage 1 froze that LM. Read from the checkpoints, so a resumed run knows it.
        """
        losses = [ckpt.meta["loss"] for ckpt in self.checkpointer.list_checkpoints() if "loss" in ckpt.meta]
        return min(losses, default=float("inf"))

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        stats.update(PPL=float(torch.tensor(stage_loss).exp()), ACC=self.correct / max(self.total, 1))
        self.last_stage_stats = stats
        if stage == sb.Stage.VALID:
            best_before = self.best_valid_loss()
            self.log_and_save_epoch(stats, epoch, min_keys=["loss"])  # the most recent (resume) and the best
            if if_main_process() and stage_loss <= best_before:
                export_lm(self.hparams.lm, self.hparams.export_folder)
        else:
            self.hparams.train_logger.log_stats(stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                                                test_stats=stats)


def validation_block_size(valid_ids, block_size, valid_text_file) -> int:
    """The training block size, or the whole validation text when it is shorter than one block.

    Why: a pool's validation share is a fraction of its lines, and a small pool (a machine without the carried
    text sources: the facts and the corpus's own lines only) gives a few sentences. The loss per token is the
    same measure on a shorter block, so the run goes on instead of stopping before its first step."""
    if valid_ids.numel() - 1 >= block_size or valid_ids.numel() < 2:
        return block_size  # enough for one block, or nothing to validate on (TokenBlocks says so)
    logger.warning("%s: %d tokens, fewer than one block of %d; validating on one block of the whole text",
                   valid_text_file, valid_ids.numel(), block_size + 1)
    return valid_ids.numel() - 1


def make_lm_datasets(hparams):
    """Token blocks of the training and validation text (text pool built first when the YAML asks for it)."""
    pool = hparams.get("text_pool")
    if pool is not None:
        run_on_main(build_text_pool, kwargs=dict(pool))
    tokenizer, cache = hparams["tokenizer"], pathlib.Path(hparams["output_folder"]) / "tokens"
    for key in ("text_file", "valid_text_file"):  # the main process writes the cache, the others read it
        run_on_main(tokenize_text_file, args=[hparams[key], tokenizer, cache])
    train_ids = tokenize_text_file(hparams["text_file"], tokenizer, cache)
    valid_ids = tokenize_text_file(hparams["valid_text_file"], tokenizer, cache)
    block = hparams["block_size"]
    valid = TokenBlocks(valid_ids, validation_block_size(valid_ids, block, hparams["valid_text_file"]))
    limit = hparams.get("valid_blocks")
    if limit is not None and len(valid) > limit:
        valid = torch.utils.data.Subset(valid, range(limit))
    return TokenBlocks(train_ids, block), valid


def run_lm_pretraining(argv, usage=None):
    """Arguments -> YAML -> DDP group -> experiment folder -> text (checked, tokenised) -> fit -> export."""
    hparams_file, run_opts, overrides = parse_run_arguments(argv, usage)
    hparams = start_experiment(hparams_file, run_opts, overrides)
    train, valid = make_lm_datasets(hparams)
    brain = LMBrain(modules={"lm": TokenLM(hparams["lm"])}, opt_class=hparams["opt_class"], hparams=hparams,
                    run_opts=run_opts, checkpointer=hparams["checkpointer"])
    sampler = ReproducibleRandomSampler(train, seed=hparams["seed"], replacement=False,
                                        num_samples=hparams["blocks_per_epoch"] or len(train))
    brain.train_sampler = sampler  # set_epoch(epoch) each epoch: a new, reproducible draw
    brain.fit(hparams["epoch_counter"], train, valid,
              train_loader_kwargs={**hparams["train_dataloader_opts"], "sampler": sampler},
              valid_loader_kwargs=hparams["valid_dataloader_opts"])
    logger.info("LM exported to %s (stage 1: --lm_source=%s)", hparams["export_folder"], hparams["export_folder"])
    end_process_group()
    return brain
