"""Loading the model and processor, and reading its special tokens."""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any

import torch

from voice_agent.engine.kv import bytes_per_token
from voice_agent.engine.qwen2_audio.core import EngineCore
from voice_agent.engine.tiny import is_demo_config
from voice_agent.errors import ModelLoadError

logger = logging.getLogger("voice_agent.engine")

# Tokens a reply must never contain: they would break the history's audio
# placeholders or its ChatML structure (the audio token itself is added from
# the config's audio_token_id).
BANNED_TOKENS = ("<|audio_bos|>", "<|audio_eos|>", "<|im_start|>")


def tune_backends(device: torch.device) -> None:
    """Process-wide kernel choices for the one engine of this process.

    On Hopper GPUs PyTorch prefers cuDNN's attention, which builds and compiles
    a new execution plan for every new (query, key) length: every decode step
    and every prefill on top of a cached conversation is a new shape, and on an
    H200 with 7B shapes that cost 50 to 700 ms of CPU per call. The flash and
    memory-efficient kernels need no per-shape plan.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


class _Loading(EngineCore):
    """Weights, processor, device and dtype; the special-token ids."""

    def _init_loading(self) -> None:
        """Nothing loaded yet."""
        self.model = None
        self.processor = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._stop_ids = set()
        self._im_end_id = -1
        self._newline_ids = []
        self._audio_token_id = -1
        self._pad_id = 0
        self._generator = None
        self._banned_ids = torch.zeros(0, dtype=torch.long)

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        """Load weights and processor (blocking; call off the event loop)."""
        if self.loaded:
            return
        tf: Any = importlib.import_module("transformers")
        name = self.model_name
        self.device = self._pick_device()
        self.dtype = self._pick_dtype(self.device)
        logger.info(
            "loading model %s on %s (%s)%s",
            name,
            self.device,
            str(self.dtype).removeprefix("torch."),
            " [demo model: replies are random noise]" if self.demo_model else "",
        )
        t0 = time.perf_counter()
        try:
            local = self.local_files_only
            processor = tf.AutoProcessor.from_pretrained(name, local_files_only=local)
            logger.info("processor loaded; loading weights")
            model = tf.Qwen2AudioForConditionalGeneration.from_pretrained(
                name, dtype=self.dtype, local_files_only=self.local_files_only
            )
            model.to(self.device)
            model.eval()
        except Exception as exc:
            raise ModelLoadError(self._load_error_message(name, exc)) from exc
        if getattr(model.config, "model_type", "") != "qwen2_audio" or not hasattr(
            processor, "feature_extractor"
        ):
            raise ModelLoadError(
                f"cannot load model {name!r}: it is not a Qwen2-Audio model; "
                "pass --model with a Qwen2-Audio directory or hub id"
            )
        if is_demo_config(model.config) and not self.demo_model:
            self.demo_model = True  # written by make-tiny-model: random weights
            logger.warning("model %s is the tiny demo model: replies are random noise", name)
        self.model = model
        self.processor = processor
        self._setup_tokens()
        if self.device.type == "cuda":
            self._generator = torch.Generator(device=self.device)
        else:
            self._generator = torch.Generator()
        self._generator.manual_seed(self.seed)
        tune_backends(self.device)
        logger.info("model %s ready in %.1f s", name, time.perf_counter() - t0)

    def _pick_device(self) -> torch.device:
        if self.device_name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device_name)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"bad device {self.device_name!r}: use auto, cpu, cuda or cuda:N"
            ) from exc

    def _pick_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype_name == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        dtypes = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }
        if self.dtype_name not in dtypes:
            raise ModelLoadError(
                f"bad dtype {self.dtype_name!r}: use auto, float32, bfloat16 or float16"
            )
        return dtypes[self.dtype_name]

    def _load_error_message(self, name: str, exc: BaseException) -> str:
        fix = "pass --model DIR with Qwen2-Audio weights, or run `voice-agent make-tiny-model DIR`"
        # A hub id is "owner/name"; anything else is meant as a directory.
        looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1
        if os.path.isdir(name):
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return f"cannot load model {name!r}: {reason[:200]}; {fix}"
        if looks_like_path:
            return f"cannot load model {name!r}: no such directory; {fix}"
        if self.local_files_only:
            return f"cannot load model {name!r}: not in the local Hugging Face cache; {fix}"
        return (
            f"cannot load model {name!r}: no such directory and it could not be downloaded "
            f"(no network?); {fix}"
        )

    def _setup_tokens(self) -> None:
        tok = self.processor.tokenizer
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        eot = tok.convert_tokens_to_ids("<|endoftext|>")
        self._im_end_id = int(im_end)
        stop = {int(im_end), int(eot)}
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(eos, int):
            stop.add(eos)
        elif isinstance(eos, list):
            stop.update(int(e) for e in eos)
        unk = tok.unk_token_id
        self._stop_ids = {s for s in stop if s is not None and s >= 0 and s != unk}
        self._newline_ids = [int(i) for i in tok.encode("\n", add_special_tokens=False)]
        self._audio_token_id = int(self.model.config.audio_token_id)
        pad = tok.pad_token_id
        self._pad_id = next(
            i
            for i in (pad, self._im_end_id, 0, 1)
            if isinstance(i, int) and i >= 0 and i != self._audio_token_id
        )
        # Tokens a reply must never contain: they would break the history's
        # audio placeholders or its ChatML structure.
        banned = {self._audio_token_id}
        for t in BANNED_TOKENS:
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i >= 0 and i != unk:
                banned.add(i)
        self._banned_ids = torch.tensor(sorted(banned), dtype=torch.long)
        self._sched.bytes_per_token = bytes_per_token(self.model.config, self.dtype)
