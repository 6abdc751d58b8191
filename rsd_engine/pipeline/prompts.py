"""Prompts: a question through the student's chat template, with the thinking block opened.

Thinking detection. The generation prompt is what rendering adds for ``add_generation_prompt=True``;
when it opens a block (``<think>`` with no ``</think>`` after it, as DeepSeek-R1 distills, QwQ and
Qwen3-Thinking-2507 do) the prompt is thinking; when it opens and closes an empty block (Qwen3 with
thinking switched off) thinking is off. A hybrid template (one with an ``enable_thinking`` switch, as
Qwen3's) whose generation prompt opens nothing gets ``<think>\\n`` appended, which is what such a model
writes first. Any other template is left as it renders: one that mentions ``<think>`` only to handle
earlier assistant turns (Qwen3-Instruct-2507, a model that never thinks) gets no block opened for it
(a model that opens one itself is read as having done so: traces.py). A tokenizer without a chat template
gets plain text (read without a BOS, as every prompt string is: the run's log says so where the tokenizer adds
one). A template that skips the system role without raising gets the system prompt in the user turn, as one that
raises does; so does a leading system turn of chat messages (the Python API's prompts, `rsd score`'s turns:
render_folded). A template that does not compile, or fails to render a prompt (an undefined name, raise_exception), is a
ChatTemplateError naming the tokenizer's folder, the row (a command's id, the Python API's prompt index) where one
is given, and jinja's own message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


class ChatTemplateError(ValueError):
    """The chat template of the tokenizer in `folder` does not compile, or fails to render a prompt (of the row
    with id `row`, or the prompt `what` names, such as the Python API's "prompt 3", where given); `reason` is
    jinja's message."""

    def __init__(self, folder, reason: str, compiles: bool = True, row=None, what: str | None = None):
        self.folder, self.reason, self.compiles = folder, reason, compiles
        if not compiles:
            super().__init__(f"the chat template of {folder} does not compile: {reason} (chat_template.jinja, or "
                             f"chat_template in tokenizer_config.json)")
        else:
            where = f" on {what}" if what else "" if row is None else f" on the prompt of id {row!r}"
            super().__init__(f"the chat template of {folder} fails{where}: {reason}")

    def of_row(self, row=None, what: str | None = None) -> "ChatTemplateError":
        """This failure, named by the row (`row`, its id) or prompt (`what`) it failed on, if any (one that does not
        compile fails on every row alike)."""
        return ChatTemplateError(self.folder, self.reason, row=row, what=what) if self.compiles else self


@dataclass(frozen=True)
class ChatPrompt:
    text: str  # what the student reads, special tokens written out
    system: str  # the system and user messages rendered into `text` (a template without a system role
    question: str  # gets the system prompt folded into the user message: system "")
    think_prefix: str = ""  # the opened thinking block that ends `text` ("" when no reasoning block)

    @property
    def thinking(self) -> bool:
        return bool(self.think_prefix)

    def messages(self, completion: str) -> list[dict]:
        """System / user / assistant chat messages of a finished trace: the assistant turn starts with the
        thinking block the prompt opened (a reasoning template may render it otherwise than the student wrote
        it: the SFT form is traces.to_sft's prompt-completion text)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": self.question},
                       {"role": "assistant", "content": self.think_prefix + completion}]


def build_prompt(tokenizer, question: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT, row=None) -> ChatPrompt:
    """The prompt for `question` in `tokenizer`'s chat format (see the module docstring); `row`, the id of the
    question's row, is named where the template fails on it."""
    try:
        return _build_prompt(tokenizer, question, system_prompt)
    except ChatTemplateError as err:
        raise err.of_row(row) from None


def _build_prompt(tokenizer, question: str, system_prompt: str) -> ChatPrompt:
    if not getattr(tokenizer, "chat_template", None):
        text = f"{system_prompt}\n\n{question}\n\n" if system_prompt else f"{question}\n\n"
        return ChatPrompt(text, system_prompt, question)
    messages = [{"role": "user", "content": question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        text, think_prefix = render_chat(tokenizer, messages)
        # A template may skip a role it does not know instead of raising: the system prompt is then lost, silently.
        rendered = not system_prompt or _renders_system(tokenizer)
    except Exception:  # templates without a system role raise (jinja2 TemplateError)
        if not system_prompt:
            raise
        rendered = False
    if not rendered:
        # The system prompt goes into the user turn; the prompt's messages are the ones rendered.
        system_prompt, question = "", f"{system_prompt}\n\n{question}"
        text, think_prefix = render_chat(tokenizer, [{"role": "user", "content": question}])
    return ChatPrompt(text, system_prompt, question, think_prefix)


_SYSTEM_PROBE = "rsd-system-turn-probe"  # a text no template rewrites (SmolLM3's drops /think from its system turn)
_renders_system_cache: dict[str, bool] = {}


def _renders_system(tokenizer) -> bool:
    """Whether the chat template renders a system turn it is given (probed once a template): False where it skips
    the turn, or raises on it but renders the user turn alone."""
    source = _template_source(tokenizer)
    if source not in _renders_system_cache:
        try:
            text = _render(tokenizer, [{"role": "system", "content": _SYSTEM_PROBE},
                                       {"role": "user", "content": "?"}], True)
            _renders_system_cache[source] = _SYSTEM_PROBE in text
        except Exception:
            try:
                _render(tokenizer, [{"role": "user", "content": "?"}], True)
            except Exception:  # a template that fails whatever it is given: its caller says so
                return True
            _renders_system_cache[source] = False
    return _renders_system_cache[source]


def plain_prompt_note(tokenizer, role: str = "student") -> str | None:
    """A line for the run's log when ``tokenizer`` has no chat template (its prompts are plain text), else None:
    a chat model whose tokenizer_config.json lost its template would otherwise read prompts it was not trained on,
    silently."""
    if getattr(tokenizer, "chat_template", None):
        return None
    bos = ""
    try:  # a tokenizer that adds a BOS to what it encodes (Llama-2, Mistral): the plain prompt is read without it
        if tokenizer.bos_token and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
            bos = f", read without the {tokenizer.bos_token} its tokenizer adds to a text it encodes"
    except Exception:  # (a tokenizer that cannot say: nothing to add)
        pass
    return (f"note: the {role}'s tokenizer has no chat template, so prompts are plain text (the system prompt, a "
            f"blank line, the question, a blank line{bos}); a chat model wants its template in tokenizer_config.json")


def control_text(tokenizer, texts: dict[str, str]) -> dict[str, list[str]]:
    """{id: the control tokens (<|im_end|>, <think>) spelled in its text} for the texts that spell one: the tokenizer
    reads such text as those tokens, so a question holding "<|im_end|>" ends its own turn (as apply_chat_template
    and a fine-tuning on the traces read it too). Control tokens: the added tokens marked special, and those
    written as markup (<think> is not marked special in Qwen3's); an added token of plain text ("÷") is no marker."""
    def control(token) -> bool:
        text = token.content
        return token.special or (len(text) > 2 and text.startswith("<") and text.endswith(">"))

    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    pieces = sorted({t.content for t in added if t.content.strip() and control(t)}, key=len, reverse=True)
    if not pieces:
        return {}
    pattern = re.compile("|".join(map(re.escape, pieces)))
    found = {key: list(dict.fromkeys(pattern.findall(text))) for key, text in texts.items()}
    return {key: spelled for key, spelled in found.items() if spelled}


def control_text_warning(found: dict[str, list[str]], role: str = "student") -> str:
    from .progress import names

    spelled = list(dict.fromkeys(piece for pieces in found.values() for piece in pieces))
    return (f"warning: the questions of {len(found)} problems spell the {role}'s control tokens "
            f"({', '.join(spelled[:4])}{', ...' if len(spelled) > 4 else ''}), which its tokenizer reads as those "
            f"tokens (a turn ended, a block opened), not as text: {names(list(found))}")


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """(text, think_prefix): ``messages`` through the chat template with the generation prompt, the
    thinking block opened as the module docstring says; think_prefix is the opened block ("" if none)."""
    text = _render(tokenizer, messages, True)
    before = _render(tokenizer, messages, False)
    generation_prompt = text[len(before):] if text.startswith(before) else text
    if THINK_OPEN not in generation_prompt:
        if "enable_thinking" in _template_source(tokenizer):  # a hybrid, thinking on: it writes <think> first
            return text + THINK_OPEN + "\n", THINK_OPEN + "\n"
        return text, ""
    opened_at = generation_prompt.rindex(THINK_OPEN)
    if THINK_CLOSE in generation_prompt[opened_at:]:
        return text, ""  # an empty, closed block: thinking switched off
    return text, generation_prompt[opened_at:]


def is_chat(prompt) -> bool:
    """A prompt given as chat messages: a non-empty list of dicts."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def chat_prompt_text(tokenizer, messages, what: str = "prompt") -> str:
    """What the model reads for a chat-message prompt (a list of {"role", "content"} dicts), as
    `rsd generate` builds its prompts: the chat template with the generation prompt, thinking opened."""
    for j, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{what}: message {j} must be a dict with string 'role' and 'content', got "
                             f"keys {sorted(m)}")
    if messages[-1]["role"] == "assistant":
        raise ValueError(f"{what} ends with an assistant message; the model answers after the last user "
                         f"message (a generation prompt is added): end with a user message")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{what} is chat messages but the student's tokenizer has no chat template: pass "
                         f"the prompt as a plain string")
    try:
        return render_folded(tokenizer, messages)[0]
    except ChatTemplateError as err:  # which of a batch's prompts, as a command names the row
        raise err.of_row(what=what) from None


def render_folded(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """render_chat of `messages` as a chat prompt renders them: where the template skips a system turn (without
    raising) or refuses one (raising: _renders_system), a leading system turn goes first in the user turn after it,
    as build_prompt does with a system prompt."""
    if len(messages) > 1 and messages[0].get("role") == "system" and messages[1].get("role") == "user" and (
            not _renders_system(tokenizer)):
        messages = [{**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"},
                    *messages[2:]]
    return render_chat(tokenizer, messages)


# Llama 3.x templates write today's date into the system turn unless given one (strftime_now): a prompt would then
# change from day to day, and a resumed run, rsd score or rsd provenance read records after another prompt than the
# one they were written after. Their own fallback date, always.
TEMPLATE_DATE = "26 Jul 2024"


def dated_template(tokenizer) -> bool:
    """Whether the chat template writes today's date whatever it is given (strftime_now without date_string, as
    SmolLM3's): its prompts differ from day to day."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    source = _template_source(tokenizer)
    return "strftime_now" in source and "date_string" not in source


def changed_prompts(held: list[dict], folder, system_prompt: str) -> list[str]:
    """Ids of the held records' problems whose record holds another prompt than a run builds now for its question
    with the tokenizer of `folder` and `system_prompt` (the same files and system prompt, which the manifest
    compares: an earlier rsd's rules). None where the template writes today's date (SmolLM3's: its prompts differ
    from day to day whatever rsd does; a template that takes date_string, as Llama 3.x's, gets TEMPLATE_DATE).
    Records without a "prompt" (written by an rsd eval before it kept one) cannot be told apart."""
    from rsd_engine.tokens import load_tokenizer

    held_prompts = {}
    for r in held:
        if isinstance(r.get("prompt"), str) and isinstance(r.get("question"), str) and "id" in r:
            held_prompts.setdefault(str(r["id"]), (r["question"], r["prompt"]))
    if not held_prompts:
        return []
    tokenizer = load_tokenizer(folder)
    if dated_template(tokenizer):
        return []
    built = {}
    for pid, (question, _) in held_prompts.items():
        if question not in built:
            built[question] = build_prompt(tokenizer, question, system_prompt, row=pid).text
    return [pid for pid, (question, prompt) in held_prompts.items() if prompt != built[question]]


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             date_string=TEMPLATE_DATE)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(tokenizer.name_or_path, f"{err.message} at line {err.lineno}", compiles=False) from None
    except jinja2.TemplateError as err:  # an undefined name, raise_exception(...)
        raise ChatTemplateError(tokenizer.name_or_path, str(err)) from None


def _template_source(tokenizer) -> str:
    template = tokenizer.chat_template
    return "\n".join(template.values()) if isinstance(template, dict) else str(template)
