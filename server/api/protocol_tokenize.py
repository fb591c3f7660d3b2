"""`POST /tokenize` and `POST /detokenize` (as vLLM names them): the request models."""

from pydantic import model_validator

from server.api.errors import invalid_request
from server.api.protocol import RequestModel
from server.api.protocol_chat import ChatMessage, ChatTemplateKwargs


class TokenizeRequest(RequestModel):
    """Either a raw `prompt`, or chat `messages` rendered by the chat template first."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool | None = True
    chat_template_kwargs: ChatTemplateKwargs | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise invalid_request("Give exactly one of 'prompt' and 'messages'.", param="prompt")
        return self

    @property
    def enable_thinking(self) -> bool | None:
        return self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]
