"""Generation behind a small interface (Hugging Face default; vLLM optional) and the generation stage."""

from sparring.generation.base import Completion, Generator, SamplingParams, batch_seed
from sparring.generation.hf import HFGenerator
from sparring.generation.stage import generate_responses

__all__ = ["Completion", "Generator", "HFGenerator", "SamplingParams", "batch_seed", "generate_responses"]
