"""A runaway agent: it never decides it is done, and its context grows with every turn.

Without a cap this loops (and pays) forever. Under rk it is stopped at the budget:

    rk run --mock --max-cost 0.05 -- python examples/runaway_agent.py

The agent does nothing special for rk. When the budget is spent, the OpenAI SDK raises on rk's 402 (it does
not retry a 402); like many agents, this one reports the error and stops.
"""

import openai

client = openai.OpenAI()
messages = [
    {"role": "system", "content": "You are a diligent research agent. Keep researching until you are sure."},
    {"role": "user", "content": "Find out everything there is to know about spend caps for AI agents."},
]

turn = 0
while True:
    turn += 1
    try:
        reply = client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=400)
    except openai.APIStatusError as exc:
        print(f"turn {turn}: the model call failed with HTTP {exc.status_code}: {exc.message}")
        break
    text = reply.choices[0].message.content or ""
    print(f"turn {turn}: {reply.usage.prompt_tokens} tokens in, {reply.usage.completion_tokens} out")
    messages.append({"role": "assistant", "content": text})
    messages.append({"role": "user", "content": "Not sure yet. Dig deeper, and repeat your findings so far. " * 8})
