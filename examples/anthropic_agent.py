"""A tool-use loop with the Anthropic SDK, streaming, as Claude-based agents run it.

    rk run --mock -- python examples/anthropic_agent.py                    # no key, no network
    rk run --max-cost 0.10 -- python examples/anthropic_agent.py           # with ANTHROPIC_API_KEY set

With a real model, the loop runs get_weather for each tool_use block and continues until Claude answers.
rk's mock replies are text only, never tool calls (a dry run must not set off your tools), so under
--mock Claude answers at once. Nothing in this file knows about rk: the SDK finds rk's proxy through
ANTHROPIC_BASE_URL.
"""

import anthropic

client = anthropic.Anthropic()
TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]


def get_weather(city: str) -> str:
    return f"Sunny and 21 °C in {city}."


messages = [{"role": "user", "content": "What is the weather in Paris and in Lyon? Use the tool."}]
for _ in range(6):  # a few model turns at most
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=1024, tools=TOOLS, messages=messages) as stream:
        message = stream.get_final_message()
    calls = [block for block in message.content if block.type == "tool_use"]
    if not calls:
        print("final answer:", "".join(block.text for block in message.content if block.type == "text"))
        break
    messages.append({"role": "assistant", "content": message.content})
    results = []
    for call in calls:
        print(f"tool call: {call.name}({call.input})")
        results.append({"type": "tool_result", "tool_use_id": call.id, "content": get_weather(**call.input)})
    messages.append({"role": "user", "content": results})
