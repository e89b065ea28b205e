"""A multi-turn agent on the OpenAI Responses API (the default of the OpenAI Agents SDK).

    rk run --mock -- python examples/responses_agent.py                    # no key, no network
    rk run --max-cost 0.10 -- python examples/responses_agent.py           # with OPENAI_API_KEY set

Each turn streams its answer and carries the conversation on with previous_response_id. rk meters every
turn from the usage in its response.completed event. Nothing in this file knows about rk.
"""

import openai

client = openai.OpenAI()
questions = [
    "In one sentence: what is a spend cap for an AI agent?",
    "And why should the cap apply to a whole run rather than to an API key?",
]

previous = None
for question in questions:
    with client.responses.stream(model="gpt-4o-mini", input=question, previous_response_id=previous) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
        response = stream.get_final_response()
    print(f"\n[{response.usage.input_tokens} tokens in, {response.usage.output_tokens} out]")
    previous = response.id
