"""llama.cpp reading the GGUF: the embedded chat template through llama-cpp-python's own chat handling.

`llama_cpp.Llama` turns the GGUF's `tokenizer.chat_template` into a `Jinja2ChatFormatter` (given the
GGUF's BOS/EOS texts) and tokenizes its prompt with the GGUF's vocabulary, special tokens parsed, adding
a BOS only when the formatter says the template did not (`added_special`). That is what the served model
(`python -m tasks.serve.app`, llama-cpp-python's OpenAI-compatible server) does for every chat request;
this renderer calls the same formatter class with the same inputs. It stops on llama.cpp's
end-of-generation tokens and the EOS text. (A final assistant message left open, the reference for Ollama's
continuation when there is no HF tokenizer, is rendered by transformers' renderer: llama-cpp-python has none.)
"""

from __future__ import annotations

from dataclasses import replace

from tasks.chat.conversations import Conversation
from tasks.chat.jinja import TemplateRefused, render_jinja
from tasks.chat.runtimes.base import Mode, Rendering, Runtime, RuntimeUnavailable, StopSet
from tasks.chat.vocab import GgufVocab


def format_prompt(template: str, bos: str, eos: str, messages: list[dict[str, str]], add_generation_prompt: bool):
    """llama-cpp-python's formatter for `template` (as `Llama` builds it from a GGUF) applied to `messages`."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(
        template=template, eos_token=eos, bos_token=bos, add_generation_prompt=add_generation_prompt
    )
    return formatter(messages=messages)


class JinjaGgufRuntime(Runtime):
    """A Jinja template rendered by llama-cpp-python's formatter and tokenized with a GGUF's vocabulary."""

    def __init__(self, vocab: GgufVocab, template: str, default_system: str | None = None):
        self.vocab = vocab
        self.template = template
        self.default_system = default_system
        self.bos_text, self.eos_text = vocab.bos_text, vocab.eos_text

    def render(self, conversation: Conversation, mode: Mode) -> Rendering:
        import jinja2

        base = Rendering(runtime=self.name, conversation=conversation.name, mode=mode)
        messages = conversation.with_default_system(self.default_system).as_dicts()
        try:
            if mode is Mode.CONTINUED:  # llama-cpp-python has no "continue"; transformers' renderer does it
                prompt = render_jinja(
                    self.template, messages, False, self.bos_text, self.eos_text, continue_final_message=True
                )
                added_special = True
            else:
                result = format_prompt(self.template, self.bos_text, self.eos_text, messages, mode is Mode.REPLY)
                prompt, added_special = result.prompt, result.added_special
        except (jinja2.TemplateError, TemplateRefused, ValueError) as exc:  # raise_exception() raises ValueError
            return replace(base, refused=str(exc))
        ids = self.vocab.tokenize(prompt, add_special=not added_special)
        return replace(base, text=prompt, tokens=tuple(ids), pieces=tuple(self.vocab.piece(t) for t in ids))

    def stops(self) -> StopSet:
        return StopSet(
            token_ids=self.vocab.eog_ids,
            strings=(self.vocab.eos_text,) if self.vocab.eos_text else (),
            source="llama.cpp end-of-generation tokens of " + self.vocab.path.name,
        )


class GgufRuntime(JinjaGgufRuntime):
    name = "llama.cpp"
    title = "llama.cpp (the GGUF's template, llama-cpp-python chat handling)"

    def __init__(self, vocab: GgufVocab):
        if not vocab.chat_template:
            raise RuntimeUnavailable(
                f"{vocab.path.name} has no tokenizer.chat_template (llama-cpp-python would fall back to its "
                "'llama-2' format)"
            )
        super().__init__(vocab, vocab.chat_template)

    def describe(self) -> str:
        return f"tokenizer.chat_template of {self.vocab.path.name}, its vocabulary (add_bos_token={self.vocab.add_bos})"
