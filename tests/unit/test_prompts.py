from illume.generation.prompts import answer_prompt, clean_answer, rationale_prompt


def test_answer_prompt_is_the_papers():
    assert answer_prompt("what colour is the square?") == "Q: what colour is the square? A:"


def test_rationale_prompt_puts_the_answer_before_seeing_that():
    assert (
        rationale_prompt("what colour is the square?", "red")
        == "Q: what colour is the square? A: red, seeing that"
    )


def test_clean_answer_stops_at_the_first_comma_or_period():
    assert clean_answer(" red, seeing that") == "red"
    assert clean_answer(" two. the") == "two"
    assert clean_answer("  yes ") == "yes"
