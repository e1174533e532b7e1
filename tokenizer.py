"""One tokenizer interface over sentencepiece `tokenizer.model` (Llama-2, Mistral, our `tiny`)
and Hugging Face `tokenizers` `tokenizer.json` (Llama-3, Qwen2.5, SmolLM2; an optional extra).
Added tokens (SEE's `<<pos>>`/`<<neg>>`) follow the base vocabulary, atomic in text and decoding."""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Callable

from artifacts import read_json, read_text
from errors import UserError


class Tokenizer:
    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 base_size: int, bos_id: int | None, eos_ids: list[int], add_bos: bool):
        self._encode, self._decode = encode, decode
        self.base_size = base_size  # ids below this belong to the back-end
        self.bos_id, self.eos_ids, self.add_bos = bos_id, eos_ids, add_bos
        self.added: dict[str, int] = {}
        self._added_re: re.Pattern | None = None
        self.chat_template: str | None = None  # the checkpoint's Jinja chat template, if it has one

    def __len__(self) -> int:
        return max([self.base_size - 1, *self.added.values()]) + 1

    @property
    def eos_id(self) -> int:
        return self.eos_ids[0]

    def add_tokens(self, tokens: list[str], start: int) -> list[int]:
        """Give `tokens` the ids start, start+1, ... (start = the model's vocabulary size)."""
        if start < len(self):
            raise ValueError(f"added ids must start after the vocabulary so far ({len(self)}), not "
                             f"at {start}")
        repeated = sorted({t for t in tokens if t in self.added or tokens.count(t) > 1})
        if repeated:
            raise ValueError(f"tokens already added: {repeated}")
        ids = list(range(start, start + len(tokens)))
        self.added.update(zip(tokens, ids))
        # longest first (a token that prefixes another never wins), captured (split keeps them)
        alternatives = sorted(self.added, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")
        return ids

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Ids of text; BOS as the checkpoint says unless `bos` is given, EOS only if asked."""
        with_bos = (self.add_bos if bos is None else bos) and self.bos_id is not None
        ids = [self.bos_id] if with_bos else []
        pieces = self._added_re.split(text) if self._added_re else [text]
        for i, piece in enumerate(pieces):  # text, added token, text, ...
            if i % 2:
                ids.append(self.added[piece])
            elif piece:
                ids += self._encode(piece)
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids (encode's inverse: drops a leading BOS it added), added tokens literal."""
        if ids and self.add_bos and ids[0] == self.bos_id:
            ids = ids[1:]
        literal = {i: t for t, i in self.added.items()}
        return "".join("".join(literal[i] for i in run) if added else self._decode(list(run))
                       for added, run in itertools.groupby(ids, key=lambda i: i in literal))

    def chat(self, query: str) -> str:
        """The query as one user turn in the checkpoint's chat template, ready for the answer."""
        if self.chat_template is None:
            raise UserError("this checkpoint has no chat template; use the plain prompt")
        from jinja2 import TemplateError, sandbox  # installed with torch

        def raise_exception(message):
            raise UserError(f"chat template: {message}")
        env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:  # BOS comes from encode(), as for any other text
            template = env.from_string(self.chat_template)
            return template.render(messages=[{"role": "user", "content": query}],
                                   add_generation_prompt=True, bos_token="", eos_token="")
        except TemplateError as e:  # a syntax error, or what the sandbox refused
            raise UserError(f"chat template: {type(e).__name__}: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer of a Hugging Face style checkpoint directory, with its BOS/EOS settings."""
        path = Path(path)
        tcfg = _read_json(path / "tokenizer_config.json")
        # generation_config.json lists every stop token (Llama-3.1 instruct has three), config one
        eos = _read_json(path / "config.json").get("eos_token_id")
        eos = _read_json(path / "generation_config.json").get("eos_token_id", eos)
        if (path / "tokenizer.json").exists():
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise UserError(f"{path}/tokenizer.json needs the optional `tokenizers` package: "
                                f"pip install '.[gguf]'")
            try:
                tk = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
                raise UserError(f"{path / 'tokenizer.json'}: unreadable ({e})") from None
            tok = cls.from_hf(tk, eos, tcfg)
        elif (path / "tokenizer.model").exists():
            import sentencepiece as spm
            try:
                sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            except (RuntimeError, OSError) as e:
                raise UserError(f"{path / 'tokenizer.model'}: not a sentencepiece model "
                                f"({e})") from None
            # LlamaTokenizer adds BOS unless told otherwise
            tok = cls(sp.encode, sp.decode, sp.get_piece_size(), sp.bos_id(),
                      _ids(eos) or [sp.eos_id()], tcfg.get("add_bos_token", True))
        else:
            raise UserError(f"no tokenizer.json or tokenizer.model in {path}")
        template = tcfg.get("chat_template")
        if not isinstance(template, str) and (path / "chat_template.jinja").exists():
            template = read_text(path / "chat_template.jinja")
        tok.chat_template = template if isinstance(template, str) else None
        return tok

    @classmethod
    def from_hf(cls, tk, eos: int | list[int] | None, tcfg: dict) -> "Tokenizer":
        """Wrap a `tokenizers.Tokenizer`; BOS is added when its post-processor adds one."""
        plain = tk.encode("a", add_special_tokens=False).ids
        full = tk.encode("a", add_special_tokens=True).ids
        post_bos = full[0] if len(full) > len(plain) and full[0] != plain[0] else None
        bos_id = post_bos
        if bos_id is None and _content(tcfg.get("bos_token")):
            bos_id = tk.token_to_id(_content(tcfg["bos_token"]))
        add_bos = tcfg.get("add_bos_token", post_bos is not None)
        eos_ids = _ids(eos)
        if not eos_ids and _content(tcfg.get("eos_token")):
            eos_ids = [tk.token_to_id(_content(tcfg["eos_token"]))]
        if not eos_ids:
            raise UserError("the checkpoint names no EOS token (generation_config.json, "
                            "config.json or tokenizer_config.json)")
        return cls(lambda s: tk.encode(s, add_special_tokens=False).ids,
                   lambda ids: tk.decode(ids, skip_special_tokens=False),
                   tk.get_vocab_size(with_added_tokens=True), bos_id, eos_ids, add_bos)

    @classmethod
    def from_gguf(cls, tokens: list[str], merges: list[str], token_types: list[int], pre: str,
                  bos_id: int | None, eos_id: int, add_bos: bool) -> "Tokenizer":
        """Rebuild a byte-level BPE tokenizer (GGUF `tokenizer.ggml.model` gpt2) from its merges."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        # llama.cpp's smollm pre-tokenizer: every digit on its own, then the GPT-2 split
        split = {"gpt2": [], "smollm": [pre_tokenizers.Digits(individual_digits=True)]}
        if pre not in split:
            raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: "
                            f"{', '.join(split)})")
        tk = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                                    [tuple(m.split(" ", 1)) for m in merges]))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.pre_tokenizer = pre_tokenizers.Sequence(split[pre] + [byte_level])
        tk.decoder = decoders.ByteLevel()
        # GGUF token type 3 (CONTROL): special tokens such as <|im_end|>, matched whole in text
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, kind in zip(tokens, token_types) if kind == 3])
        return cls(lambda s: tk.encode(s, add_special_tokens=False).ids,
                   lambda ids: tk.decode(ids, skip_special_tokens=False),
                   len(tokens), bos_id, [eos_id], add_bos)


def _read_json(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _ids(x: int | list[int] | None) -> list[int]:
    return [x] if isinstance(x, int) else list(x or [])
