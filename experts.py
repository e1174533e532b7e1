"""SEE experts: task reconstruction (Eq. 4), and the expert E_i = (M_0, L_i) itself, a LoRA adapter
plus its indicator rows (or a MoSEs/SETA stage of sub-experts). An expert answers a query with an
indicator first: o_pos ("this is my task", then the response) or o_neg ("not mine")."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

import lora
from artifacts import check_digests, check_fields, digest, read_sealed, read_tensors, seal
from checkpoint import atomic_dir, load
from data import Example
from errors import UserError
from model import Llama
from tokenizer import Tokenizer

# Indicator choices (paper Table 4); in-vocabulary strings without meaning may span several tokens
INDICATORS = {"added": ("<<pos>>", "<<neg>>"), "non-semantic": ("«pos»", "«neg»"),
              "semantic": ("Yes", "No")}
# How a query is put to every model (experts and base alike): "plain" is the SuperNI prompt and an
# answer cue; "chat" one user turn in the checkpoint's chat template (instruct models need it).
PROMPT = "{query}\nOutput:"
TEMPLATES = ("auto", "chat", "plain")
UNROUTED = "none"  # a baseline's indicator type: it answers every query and is not routed
EXPERT_FILE, ROWS_FILE = "expert.json", "indicators.safetensors"
SUBEXPERTS_FILE = "subexperts.safetensors"
# MoSEs/SETA: what only training on needs (free weights, importance, imprints); may be deleted
TRAINING_FILE = "training-state.safetensors"


# What an expert emitted first (paper Sec. 3, Inference): o_pos (it answers), o_neg (the next older
# expert is asked), or neither indicator (an exception: the base model answers)
POS, NEG, NEITHER = "o_pos", "o_neg", "neither"


@dataclass
class Indicators:
    kind: str
    pos: list[int]  # token ids of o_pos
    neg: list[int]  # token ids of o_neg

    def read(self, tokens: list[int]) -> str:
        """POS, NEG or NEITHER: which indicator the first generated tokens spell."""
        if tokens[:len(self.pos)] == self.pos:
            return POS
        if tokens[:len(self.neg)] == self.neg:
            return NEG
        return NEITHER

    @property
    def added(self) -> list[int]:
        """Added indicator tokens (none for in-vocabulary ones): never part of a response, so not
        generated after o_pos (a briefly trained expert may otherwise repeat <<pos>>)."""
        return self.pos + self.neg if self.kind == "added" else []


def setup_indicators(model: Llama, tok: Tokenizer, kind: str = "added") -> Indicators:
    """The o_pos/o_neg ids; for 'added' the two tokens join the tokenizer and the model (once)."""
    if kind not in INDICATORS:
        raise UserError(f"unknown indicator type {kind!r}; known: {', '.join(INDICATORS)}")
    pos, neg = INDICATORS[kind]
    if kind == "added" and pos not in tok.added:
        tok.add_tokens([pos, neg], model.n_vocab)
        model.extend_vocab(2)
    ind = Indicators(kind, tok.encode(pos, bos=False), tok.encode(neg, bos=False))
    # routing reads the first tokens an expert generates, so neither indicator may begin the other
    if ind.neg[:len(ind.pos)] == ind.pos or ind.pos[:len(ind.neg)] == ind.neg:
        raise UserError(f"indicators {pos!r} and {neg!r} begin one another in this tokenizer; "
                        f"routing could not tell them apart")
    return ind


def resolve_template(tok: Tokenizer, template: str) -> str:
    if template not in TEMPLATES:
        raise UserError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if tok.chat_template else "plain"
    return template


def prompt_ids(tok: Tokenizer, query: str, max_source: int, template: str = "plain") -> list[int]:
    """The query as the model sees it, cut to max_source tokens (its start and what follows it)."""
    mark = "\x00QUERY\x00"
    head, tail = (tok.chat(mark) if template == "chat" else PROMPT.format(query=mark)).split(mark)
    ids = tok.encode(head + query + tail)
    if len(ids) <= max_source:
        return ids
    # too long: cut the query, keep the tail (encoded alone: sentencepiece may add a leading space)
    ids, tail_ids = tok.encode(head + query), tok.encode(tail, bos=False)
    if max_source <= len(tail_ids) + 1:
        raise UserError(f"max source length {max_source} leaves no room for the query")
    return ids[:max_source - len(tail_ids)] + tail_ids


@dataclass
class TrainSample:
    ids: list[int]
    start: int  # ids[start:] are the targets: the indicator, and for positives the response and EOS


def reconstruct(current: list[Example], rehearsed: list[Example], tok: Tokenizer,
                ind: Indicators | None, max_source: int = 1024, max_target: int = 512,
                template: str = "plain") -> list[TrainSample]:
    """Eq. 4: D^_i = {(q, o_pos, r)} for the current task  U  {(q, o_neg)}
    for rehearsed earlier queries.

    Only the targets enter the loss (Eq. 5); the query tokens are context. Negatives have
    no response and no EOS: Eq. 5 asks only for o_neg. Sequences are built from ids, so
    the indicator is always the same tokens whatever text surrounds it. Without indicators
    (ind None: the baselines, which do not route) every sample is (q, r), and rehearsed
    examples are replayed in full.
    """
    samples = []
    for ex in current + (rehearsed if ind is None else []):
        q = prompt_ids(tok, ex.query, max_source, template)
        target = (ind.pos if ind else []) + tok.encode(ex.outputs[0], bos=False)
        target = target[:max_target - 1] + [tok.eos_id]
        samples.append(TrainSample(q + target, len(q)))
    for ex in rehearsed if ind else []:
        q = prompt_ids(tok, ex.query, max_source, template)
        samples.append(TrainSample(q + ind.neg, len(q)))
    return samples


EXPERT_FIELDS = ("name", "task", "base_model", "indicator", "max_source", "template")


@dataclass
class StoredExpert:
    """What both kinds of expert hold: the fields of EXPERT_FIELDS, LoRA settings and weights."""
    name: str
    task: str
    base_model: str
    indicator: str
    max_source: int  # query tokens kept in training; evaluation cuts queries the same way
    template: str  # "plain" or "chat": how its queries were put
    lora: lora.LoraConfig
    adapter: dict[str, torch.Tensor]  # PEFT-keyed LoRA weights; SubExpert: its inference state

    def write_meta(self, directory: Path, extra: dict) -> None:
        """expert.json: EXPERT_FIELDS, counts, `extra`, and each file's sha256 (checked on load)."""
        meta = {k: getattr(self, k) for k in (*EXPERT_FIELDS, "counts")}
        files = {f.name: digest(f) for f in sorted(directory.iterdir())}
        record = seal({**meta, **extra, "files": files})
        (directory / EXPERT_FILE).write_text(json.dumps(record, indent=2) + "\n")


@dataclass
class LoraExpert(StoredExpert):
    """One SEE expert (or a baseline's adapter): a LoRA adapter (PEFT layout) and indicator rows."""
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict = field(default_factory=dict)  # what it trained, recorded by train.py

    @classmethod
    def from_model(cls, model: Llama, name: str, task: str, base_model: str, indicator: str,
                   max_source: int, template: str, cfg: lora.LoraConfig,
                   counts: dict | None = None) -> "LoraExpert":
        rows = {}
        if indicator == "added":
            rows["embed"] = model.extra_embed.detach().float().clone()
            if not model.config.tie_embeddings:
                rows["head"] = model.extra_head.detach().float().clone()
        adapter = {k: v.float().clone() for k, v in lora.adapter_state(model, name).items()}
        return cls(name, task, base_model, indicator, max_source, template, cfg, adapter, rows,
                   dict(counts or {}))

    def save(self, path: str | Path) -> None:
        with atomic_dir(path) as tmp:
            lora.write_adapter(self.adapter, self.lora, tmp, self.base_model)
            if self.rows:
                save_file({k: v.contiguous() for k, v in self.rows.items()}, tmp / ROWS_FILE)
            self.write_meta(tmp, {})

    @classmethod
    def load(cls, path: Path, meta: dict) -> "LoraExpert":
        """The expert in `path`, whose expert.json (`meta`) load_expert has checked."""
        cfg, adapter = lora.read_adapter(path)
        rows = read_tensors(path / ROWS_FILE) if meta["indicator"] == "added" else {}
        if meta["indicator"] == "added" and ("embed" not in rows or set(rows) - {"embed", "head"}):
            raise UserError(f"{path / ROWS_FILE}: need the tensors 'embed' (and 'head'), "
                            f"got {', '.join(rows) or 'none'}")
        return cls(*[meta[k] for k in EXPERT_FIELDS], cfg, adapter, rows, meta["counts"])

    def attach(self, model: Llama) -> None:
        """Add this expert's adapter to the model (the indicator rows are put in place by `use`)."""
        if self.rows:
            need = {"embed": tuple(model.extra_embed.shape)}
            if not model.config.tie_embeddings:
                need["head"] = tuple(model.extra_head.shape)
            shapes = {k: tuple(v.shape) for k, v in self.rows.items()}
            if shapes != need:
                raise UserError(f"{self.name}: the indicator rows in {ROWS_FILE} have shapes "
                                f"{shapes}, the model needs {need}")
        lora.add_adapter(model, self.name, self.lora)
        lora.load_adapter_state(model, self.name, self.adapter)

    def use(self, model: Llama) -> None:
        """Make this (attached) expert the one the model runs: its adapter and indicator rows."""
        lora.set_adapter(model, self.name)
        with torch.no_grad():
            if "embed" in self.rows:
                model.extra_embed.copy_(self.rows["embed"])
            if "head" in self.rows:
                model.extra_head.copy_(self.rows["head"])


def split_prefix(tensors: dict[str, torch.Tensor],
                 prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tensors named prefix + name, by name, and the others."""
    inside = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    return inside, {k: v for k, v in tensors.items() if not k.startswith(prefix)}


@dataclass
class SubExpert(StoredExpert):
    """A MoSEs/SETA stage: one set of sparse sub-experts holding every task so far. `adapter` is
    what inference needs, `keys` each task's prompt key (SETA: gate row); `training` (None: dropped)
    and `imprints` (SETA: each task's gate row as imprinted) are what only a next stage needs."""
    sub: lora.SubExpertConfig
    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    training: dict[str, torch.Tensor] | None = None
    imprints: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict = field(default_factory=dict)  # what it trained and holds, recorded by train.py

    @classmethod
    def from_model(cls, model: Llama, name: str, task: str, base_model: str, indicator: str,
                   max_source: int, template: str, cfg: lora.LoraConfig, sub: lora.SubExpertConfig,
                   keys: dict[str, torch.Tensor] | None = None,
                   imprints: dict[str, torch.Tensor] | None = None,
                   counts: dict | None = None) -> "SubExpert":
        state, training = lora.subexpert_state(model)
        return cls(name, task, base_model, indicator, max_source, template, cfg, state, sub,
                   dict(keys or {}), training, dict(imprints or {}), dict(counts or {}))

    def save(self, path: str | Path) -> None:
        with atomic_dir(path) as tmp:
            keys = {f"keys.{t}": v for t, v in self.keys.items()}
            save_file({k: v.contiguous() for k, v in {**self.adapter, **keys}.items()},
                      tmp / SUBEXPERTS_FILE)
            if self.training is not None:
                imprints = {f"imprints.{t}": v for t, v in self.imprints.items()}
                save_file({k: v.contiguous() for k, v in {**self.training, **imprints}.items()},
                          tmp / TRAINING_FILE)
            sizes = {f.name: f.stat().st_size for f in tmp.iterdir()}
            self.counts.update(bytes=sizes[SUBEXPERTS_FILE],
                               training_bytes=sizes.get(TRAINING_FILE, 0))
            self.write_meta(tmp, dict(lora=dataclasses.asdict(self.lora),
                                      sub=dataclasses.asdict(self.sub)))

    @classmethod
    def load(cls, path: Path, meta: dict) -> "SubExpert":
        """The stage in `path`, whose expert.json (`meta`) load_expert has checked."""
        try:
            cfg, sub = lora.LoraConfig(**meta["lora"]), lora.SubExpertConfig(**meta["sub"])
        except (KeyError, TypeError, UserError) as e:
            raise UserError(f"{path / EXPERT_FILE}: malformed sub-expert settings ({e})") from None
        keys, adapter = split_prefix(read_tensors(path / SUBEXPERTS_FILE), "keys.")
        training, imprints = None, {}
        if (path / TRAINING_FILE).is_file():  # absent: dropped, and the stage is for inference only
            imprints, training = split_prefix(read_tensors(path / TRAINING_FILE), "imprints.")
        return cls(*[meta[k] for k in EXPERT_FIELDS], cfg, adapter, sub, keys, training, imprints,
                   meta["counts"])

    def attach(self, model: Llama) -> None:
        """Add the sub-expert layers to the model, once for all stages (`use` loads a stage)."""
        bad = [t for t, k in self.keys.items() if k.shape != (model.config.dim,)]
        if bad:
            raise UserError(f"{self.name}: task keys {', '.join(bad)} in {SUBEXPERTS_FILE} are not "
                            f"{model.config.dim} wide")
        if not lora.subexpert_layers(model):
            lora.add_subexperts(model, self.lora, self.sub)

    def use(self, model: Llama) -> None:
        """Make this (attached) stage the one the model runs; lora.set_task picks the task."""
        lora.load_subexpert_state(model, self.adapter, self.training)


Expert = LoraExpert | SubExpert


def load_expert(path: str | Path) -> Expert:
    """An expert directory, of the kind its expert.json names, every file it needs checked."""
    path = Path(path)
    if not (path / EXPERT_FILE).is_file():
        raise UserError(f"{path} is not an expert directory (no {EXPERT_FILE})")
    meta = read_sealed(path / EXPERT_FILE)
    check_fields(meta, path / EXPERT_FILE, name=str, task=str, base_model=str, indicator=str,
                 max_source=int, template=str, counts=dict, files=dict)
    if meta["indicator"] not in (*INDICATORS, UNROUTED) or meta["template"] not in TEMPLATES \
            or meta["max_source"] < 1 or not meta["name"] or "." in meta["name"]:
        raise UserError(f"{path / EXPERT_FILE}: unknown indicator {meta['indicator']!r} or "
                        f"template {meta['template']!r}, max_source {meta['max_source']} < 1, or a "
                        f"name {meta['name']!r} empty or with a '.'")
    check_digests(path, meta["files"], path / EXPERT_FILE, optional=(TRAINING_FILE,))
    return (SubExpert if "sub" in meta else LoraExpert).load(path, meta)


def load_system(model_name: str | None, expert_dirs: list[str], device,
                dtype) -> tuple[Llama, Tokenizer, list[Expert], Indicators | None, str]:
    """The base model with the given experts attached (in training order)."""
    experts = [load_expert(d) for d in expert_dirs]
    bases = {e.base_model for e in experts}
    kinds = {e.indicator for e in experts}
    prompts = {(e.template, e.max_source, getattr(e, "sub", None)) for e in experts}
    if len(bases) > 1 or len(kinds) > 1 or len(prompts) > 1:
        raise UserError(f"experts disagree on base model, indicator type or prompt: "
                        f"{sorted(bases)}, {sorted(kinds)}")
    model_name = model_name or (bases.pop() if bases else "smollm2-135m")
    model, tok = load(model_name, dtype=dtype, device=device)
    kind = kinds.pop() if experts else UNROUTED
    ind = setup_indicators(model, tok, kind) if kind != UNROUTED else None
    for e in experts:
        e.attach(model)
    return model, tok, experts, ind, model_name


@contextlib.contextmanager
def base_model(model: Llama):
    """Run the bare base model M_0: no adapter, and no indicator tokens it could emit."""
    lora.set_adapter(model, None)
    extra = model.extra_embed, model.extra_head
    model.extra_embed = model.extra_head = None
    try:
        yield model
    finally:
        model.extra_embed, model.extra_head = extra
