"""A chat template that renders tools, tool calls, tool results and a template kwarg.

Written for these tests in the shape tool-calling models publish (Qwen, Hermes): the tools as
JSON in the system turn, each call as JSON in the assistant turn, results in their own turn, and
`enable_thinking=False` adding an empty think block to each assistant turn. It uses the tiny
model's role tokens, so vLLM can serve the tiny model with it (`--chat-template`).
"""

from __future__ import annotations

# HF and vLLM render with trim_blocks: a newline right after a tag is dropped, so each newline
# here is an expression.
TOOLS_TEMPLATE = (
    "{{ bos_token }}"
    "{% set think = '<think></think>\\n' if enable_thinking is defined and enable_thinking is false"
    " else '' %}"
    "{% set rest = messages %}"
    "{% if messages[0]['role'] == 'system' %}{% set rest = messages[1:] %}{% endif %}"
    "{% if tools or messages[0]['role'] == 'system' %}{{ '<|system|>\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{% if tools %}{{ 'You may call these tools:\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ 'Call one as <call>{\"name\": ..., \"arguments\": ...}</call>.' }}{% endif %}"
    "{{ eos_token + '\\n' }}"
    "{% endif %}"
    "{% for message in rest %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<|user|>\\n<result id=' + (message['tool_call_id'] | tojson) + '>' + message['content'] }}"
    "{{ '</result>' + eos_token + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + think + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<call>{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' }}"
    "{{ (call['function']['arguments'] | tojson) + '}</call>' }}"
    "{% endfor %}{{ eos_token + '\\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' + think }}{% endif %}"
)
