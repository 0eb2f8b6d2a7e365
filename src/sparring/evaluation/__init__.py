"""In-loop evaluation: held-out answers scored by a verifier (``eval.verifier``) and real-response log-probs."""

from sparring.evaluation.heldout import EvalSet, evaluate, evaluate_with_answers, load_eval_set

__all__ = ["EvalSet", "evaluate", "evaluate_with_answers", "load_eval_set"]
