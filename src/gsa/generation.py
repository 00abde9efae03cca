"""Fast decoding: each token's whole-model step replayed from one CUDA graph.

`model.generate()` works everywhere (CPU included) through transformers. On a GPU, a batch-1 step of a 1.3B model
is a few hundred small kernels; launched one by one from Python that costs tens of ms a token. GSA's decoding
state has a fixed size, so one step can be captured once and replayed: `GraphDecoder`.
"""

from __future__ import annotations

import torch

from .layers import GatedSlotAttention
from .models.cache import GSACache


def _cache_of(output):
    cache = output.get("cache")
    return cache if cache is not None else output.get("past_key_values")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: greedy when temperature == 0, else temperature / top-k / top-p."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)


_WARMUP_STEPS = 2  # eager steps before a capture


class GraphDecoder:
    """Prefill with the chunked kernels, then decode with a captured CUDA graph of one model step.

    Greedy decoding runs wholly on the device: the graph holds the model step, the argmax, the end-of-sequence
    bookkeeping and the write of the token into the output, so the host only replays it (and looks at the
    end-of-sequence flags every `check_every` tokens). Sampling replays the model step and samples outside the
    graph. On a CPU (or with use_graph=False) the same step runs eagerly, which is how its logic is tested.

    The captured step is kept for the next call of the same batch size, end-token settings and weights: that call
    copies its prefill's states in and replays, without capturing again (`release()` frees the graph and its
    states, ~67 MB a layer at batch 64 of the 1.3B model).

    Only for models whose every layer is GSA (an attention layer's cache grows, so its shapes change per step).
    """

    def __init__(self, model, use_graph: bool | None = None, check_every: int = 16):
        if not all(isinstance(layer.attn, GatedSlotAttention) for layer in model.model.layers):
            raise ValueError("CUDA-graph decoding needs every layer to be GSA (attention layers have a growing cache)")
        self.model = model
        self.use_graph = use_graph
        self.check_every = check_every
        self._kept: _CapturedStep | None = None

    def release(self) -> None:
        """Free the kept graph and its decoding state (the next generate() captures again)."""
        self._kept = None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 callback=None) -> torch.Tensor:
        """input_ids [B, T] on the model's device; returns [B, T + new] as transformers' generate() would: after
        a sequence's end token come pad_token_id (default: the end token), and decoding stops once every
        sequence has ended. callback(tokens [B]) is called with each new token (a host sync per token)."""
        if max_new_tokens < 1:
            return input_ids
        model = self.model.eval()
        use_graph = self.use_graph if self.use_graph is not None else input_ids.is_cuda
        greedy = temperature <= 0
        # warm-up and capture run the step before the real tokens and write columns the run then rewinds over:
        # room for them even when max_new_tokens is small
        columns = max_new_tokens + _WARMUP_STEPS + 1
        reuse = False
        if use_graph:
            key = _CapturedStep.key_of(model, input_ids, eos_token_id, pad_token_id, greedy)
            reuse = self._kept is not None and self._kept.fits(key, max_new_tokens)
            if not reuse:
                self._kept = None  # the old graph's memory goes before the prefill and the new capture
        out = model(input_ids, use_cache=True, logits_to_keep=1)
        cache: GSACache = _cache_of(out)
        first = sample_next(out.logits[:, -1], temperature, top_k, top_p)
        del out
        if reuse:
            self._kept.load(cache)
            del cache  # the graph's states hold it now
            self._kept.run.restart()
            self._kept.run.accept(first, step=0)
            run, step = self._kept.run, self._kept.replay
        elif use_graph:
            run = _DecodeRun(input_ids, max(columns, _MIN_COLUMNS), eos_token_id, pad_token_id)
            run.accept(first, step=0)
            self._kept = _CapturedStep(key, run, cache, self._capture(self._model_step(run, cache, greedy), run, cache))
            step = self._kept.replay
        else:
            run = _DecodeRun(input_ids, columns, eos_token_id, pad_token_id)
            run.accept(first, step=0)
            step = self._model_step(run, cache, greedy)
        done = 1
        if callback is not None:
            callback(run.tokens[:, 0].clone())
        while done < max_new_tokens and not (eos_token_id is not None and bool(run.finished.all())):
            for _ in range(self.check_every if callback is None else 1):
                logits = step()
                if not greedy:
                    run.accept(sample_next(logits, temperature, top_k, top_p))
                done += 1
                if callback is not None:
                    callback(run.tokens[:, done - 1].clone())  # the buffer is reused by the next call
                if done == max_new_tokens:
                    break
        result = torch.cat([input_ids, run.tokens[:, : run.length(done)]], 1)
        if use_graph:
            self._kept.finished_on_stream()
        return result

    def _model_step(self, run: "_DecodeRun", cache: GSACache, greedy: bool):
        """One decoding step of the model on run's token, in cache's states; greedy: the argmax taken and written
        into the run on the device (so that the graph holds it)."""
        model = self.model

        def model_step():
            logits = model(run.token, cache=cache, use_cache=True).logits[:, -1]
            if greedy:
                run.accept(logits.argmax(-1))  # the step counter lives on the device: graph-safe
            return logits

        return model_step

    def _capture(self, model_step, run: "_DecodeRun", cache: GSACache):
        """Capture model_step in a CUDA graph; returns a function that replays it and gives its logits. Warm-up
        and capture advance the slot states and the run's buffers, so both are restored afterwards."""
        saved = [(s.hk.clone(), s.hv.clone(), tuple(c.clone() for c in s.conv) if s.conv else None)
                 for s in cache.states]
        saved_run = run.snapshot()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(_WARMUP_STEPS):  # on the side stream (compiles, allocates)
                model_step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model_step()
        for state, (hk, hv, conv) in zip(cache.states, saved):
            state.hk.copy_(hk)
            state.hv.copy_(hv)
            if conv:
                for live, kept in zip(state.conv, conv):
                    live.copy_(kept)
        run.restore(saved_run)

        def replay():
            graph.replay()
            return logits

        return replay


_MIN_COLUMNS = 64  # a kept graph's token buffer: short generations of one size share one capture


class _CapturedStep:
    """A captured decoding step kept for the next generate() call: the graph reads and writes one run's buffers
    and one cache's states, so a later call of the same batch size and settings copies its prefill's states into
    that cache and restarts the run instead of capturing again (a capture costs two eager steps and the capture,
    tens of ms of host time at batch 1 of a 1.3B model)."""

    def __init__(self, key: tuple, run: "_DecodeRun", cache: GSACache, replay):
        self.key, self.run, self.cache, self.replay = key, run, cache, replay
        self.done: torch.cuda.Event | None = None

    @staticmethod
    def key_of(model, input_ids: torch.Tensor, eos_token_id, pad_token_id, greedy: bool) -> tuple:
        """What the graph depends on and a call can change: the batch size, the ids' dtype and device, the
        end-token handling and greedy selection baked into the step, inference mode (its tensors cannot be updated
        outside it), autocast, and every weight's storage (a model moved or cast since holds new tensors, which the
        graph would not read). Not in it, so `release()` after changing them: the kernels' launch settings
        (STEP_LAUNCH, fused_gemv's GEMV_LAUNCH and ENABLED), a layer's backend, hooks, the TF32 flags."""
        device = input_ids.device
        autocast = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
        weights = tuple((t.data_ptr(), t.dtype, t.shape) for t in (*model.parameters(), *model.buffers()))
        return (input_ids.shape[0], input_ids.dtype, device, eos_token_id, pad_token_id, greedy,
                torch.is_inference_mode_enabled(), autocast, weights)

    def fits(self, key: tuple, max_new_tokens: int) -> bool:
        """Whether a call with this key can replay the graph (the capture's warm-up columns are not needed again)."""
        return key == self.key and max_new_tokens <= self.run.tokens.shape[1]

    def finished_on_stream(self) -> None:
        """Mark the end of a call's replays, so that a next call on another stream waits for them before it
        overwrites the run's buffers and the states."""
        if self.run.token.is_cuda:
            self.done = torch.cuda.Event()
            self.done.record()

    def load(self, cache: GSACache) -> None:
        """Copy a new prefill's states into the states the graph works on (after the previous call's replays)."""
        if self.done is not None:
            torch.cuda.current_stream().wait_event(self.done)
        for kept, new in zip(self.cache.states, cache.states):
            kept.hk.copy_(new.hk)
            kept.hv.copy_(new.hv)
            if kept.conv:
                for live, fresh in zip(kept.conv, new.conv):
                    live.copy_(fresh)
        self.cache.seen_tokens = cache.seen_tokens


class _DecodeRun:
    """Device buffers of one decoding run: the next input token [B, 1], the generated tokens [B, columns], each
    sequence's end flag and the device-side step counter (so a captured step writes to the right column)."""

    def __init__(self, input_ids: torch.Tensor, columns: int, eos_token_id, pad_token_id):
        B, device = input_ids.shape[0], input_ids.device
        self.eos = eos_token_id
        self.fill = pad_token_id if pad_token_id is not None else eos_token_id
        self.token = input_ids.new_zeros(B, 1)
        self.tokens = input_ids.new_zeros(B, columns)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)

    def accept(self, token: torch.Tensor, step: int | None = None) -> None:
        """Take the next token of every sequence ([B]); ended sequences get the fill token instead."""
        if self.eos is not None:
            token = torch.where(self.finished, torch.full_like(token, self.fill), token)
            self.finished |= token == self.eos
        if step is not None:
            self.step.fill_(step)
        self.tokens.index_copy_(1, self.step, token[:, None])
        self.step.add_(1)
        self.token.copy_(token[:, None])

    def length(self, done: int) -> int:
        """Generated columns to return: up to the step at which the last sequence ended (checks run in blocks,
        so a few fill columns past it may exist), else all `done`."""
        if self.eos is None or not bool(self.finished.all()):
            return done
        ended_at = (self.tokens[:, :done] == self.eos).int().argmax(1)  # first end token of each sequence
        return int(ended_at.max()) + 1

    def snapshot(self):
        return tuple(t.clone() for t in (self.token, self.tokens, self.finished, self.step))

    def restart(self) -> None:
        """No sequence ended (a kept run reused by another call; the first token's accept resets the step)."""
        self.finished.zero_()

    def restore(self, saved) -> None:
        for live, kept in zip((self.token, self.tokens, self.finished, self.step), saved):
            live.copy_(kept)


class TextPrinter:
    """Streams decoded text to a file as tokens arrive: a transformers streamer (`put`/`end`) and a GraphDecoder
    callback at once. Works with any tokenizer that has `decode(ids)`; prints only whole characters."""

    def __init__(self, tokenizer, file=None, skip_first_put: bool = True):
        import sys

        self.tokenizer = tokenizer
        self.file = file or sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.skip_next = skip_first_put  # generate() first puts the prompt

    def put(self, value: torch.Tensor) -> None:
        if self.skip_next:
            self.skip_next = False
            return
        self.__call__(value)

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.extend(int(t) for t in tokens.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
            return
        self.file.write(text[self.printed :])
        self.file.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.file.write(text[self.printed :] + "\n")
        self.file.flush()


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a saved model folder (gsa train / save_pretrained / gsa convert output)")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--tokenizer", default=None, help="defaults to the one saved in the model folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode through transformers' generate()")


def run(args) -> int:
    from .data import load_tokenizer
    from .models import GSAForCausalLM
    from .models.checkpoint import check_model_folder

    torch.manual_seed(args.seed)
    # a local folder (from_pretrained would take anything else for a hub id), checked before the tokenizer, whose
    # error would otherwise name the wrong thing
    check_model_folder(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = GSAForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device).eval()
    ids = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    ids += tokenizer.encode(args.prompt)
    if not ids:
        raise SystemExit("the prompt is empty and the tokenizer has no beginning-of-sequence token; pass --prompt")
    input_ids = torch.tensor([ids], device=args.device)
    printer = TextPrinter(tokenizer)
    print(args.prompt, end="", flush=True)
    use_graph = args.device.startswith("cuda") and not args.no_cuda_graph
    if use_graph:
        try:
            decoder = GraphDecoder(model)
        except ValueError:
            use_graph = False  # hybrids with attention layers: generate() below
    if use_graph:
        decoder.generate(input_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                         eos_token_id=getattr(tokenizer, "eos_id", None),
                         pad_token_id=getattr(tokenizer, "pad_id", None),
                         callback=printer)
        printer.end()
    else:
        with torch.no_grad():
            model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=args.max_new_tokens,
                do_sample=args.temperature > 0, temperature=args.temperature if args.temperature > 0 else None,
                top_k=args.top_k if args.temperature > 0 else None, top_p=args.top_p if args.temperature > 0 else None,
                streamer=printer, pad_token_id=getattr(tokenizer, "pad_id", 0) or 0,
                eos_token_id=getattr(tokenizer, "eos_id", None),
            )
    return 0
