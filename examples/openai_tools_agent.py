"""A tool-calling agent loop with the OpenAI SDK, streaming, as most agent frameworks run it.

    rk run --mock -- python examples/openai_tools_agent.py                  # no key, no network
    rk run --max-cost 0.10 -- python examples/openai_tools_agent.py         # with OPENAI_API_KEY set

With a real model, the loop runs get_weather for each tool call and continues until the model answers.
rk's mock replies are text only, never tool calls (a dry run must not set off your tools), so under
--mock the model answers at once. Nothing in this file knows about rk.
"""

import json

import openai

client = openai.OpenAI()
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def get_weather(city: str) -> dict:
    return {"city": city, "forecast": "sunny", "celsius": 21}


messages = [{"role": "user", "content": "What is the weather in Paris and in Lyon? Use the tool."}]
for _ in range(6):  # a few model turns at most
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=TOOLS, stream=True)
    content, calls = "", {}
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.id or ""
            entry["name"] += (call.function and call.function.name) or ""
            entry["arguments"] += (call.function and call.function.arguments) or ""
    if not calls:
        print("final answer:", content)
        break
    tool_calls = [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls.values()
    ]
    messages.append({"role": "assistant", "content": content or None, "tool_calls": tool_calls})
    for c in calls.values():
        print(f"tool call: {c['name']}({c['arguments']})")
        result = get_weather(**json.loads(c["arguments"]))
        messages.append({"role": "tool", "tool_call_id": c["id"], "content": json.dumps(result)})
