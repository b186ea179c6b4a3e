"""transformers: the tokenizer's own chat template through `apply_chat_template`: the reference.

This is what a fine-tune is trained on when the data collator uses the chat template, and what
transformers' `generate()` prompts with. Its stops are `generation_config.eos_token_id` (a list or one id;
`config.json`'s eos_token_id, then the tokenizer's EOS when there is no generation config).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from tasks.chat.conversations import Conversation
from tasks.chat.jinja import TemplateRefused
from tasks.chat.runtimes.base import Mode, Rendering, Runtime, RuntimeUnavailable, StopSet


class HFRuntime(Runtime):
    name = "transformers"
    title = "transformers (apply_chat_template)"

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        if (
            not (self.model_dir / "tokenizer_config.json").is_file()
            and not (self.model_dir / "tokenizer.json").is_file()
        ):
            raise RuntimeUnavailable(f"no tokenizer in {self.model_dir}")
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(self.model_dir))
        if not self.tokenizer.chat_template:
            raise RuntimeUnavailable(f"the tokenizer in {self.model_dir} has no chat template")

    @property
    def chat_template(self) -> str:
        return str(self.tokenizer.chat_template)

    def describe(self) -> str:
        return f"{type(self.tokenizer).__name__} from {self.model_dir.name}/ with its chat template"

    def render(self, conversation: Conversation, mode: Mode) -> Rendering:
        import jinja2

        conv = conversation.as_dicts()
        kw: dict[str, Any] = (
            {"continue_final_message": True}
            if mode is Mode.CONTINUED
            else {"add_generation_prompt": mode is Mode.REPLY}
        )
        base = Rendering(runtime=self.name, conversation=conversation.name, mode=mode)
        try:
            text = self.tokenizer.apply_chat_template(conv, tokenize=False, **kw)
            ids = self.tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False, **kw)
        except (jinja2.TemplateError, TemplateRefused) as exc:
            return replace(base, refused=str(exc))
        except ValueError as exc:  # continue_final_message on a template that rewrites the final message
            return replace(base, error=str(exc))
        ids = [int(i) for i in ids]
        return replace(base, text=text, tokens=tuple(ids), pieces=tuple(self.tokenizer.convert_ids_to_tokens(ids)))

    def eos_ids(self) -> tuple[tuple[int, ...], str]:
        """The ids generate() stops on, and where they came from."""
        for name in ("generation_config.json", "config.json"):
            path = self.model_dir / name
            if path.is_file():
                value = json.loads(path.read_text()).get("eos_token_id")
                if value is not None:
                    ids = value if isinstance(value, list) else [value]
                    return tuple(int(i) for i in ids), f"{name} eos_token_id"
        eos = self.tokenizer.eos_token_id
        return ((int(eos),) if eos is not None else ()), "the tokenizer's eos_token"

    def stops(self) -> StopSet:
        ids, source = self.eos_ids()
        return StopSet(token_ids=ids, source=source)

    def piece(self, token: int) -> str:
        return str(self.tokenizer.convert_ids_to_tokens(int(token)))
