"""Critics judge candidate rationales: the paper's ROUGE-L critic and others behind one interface."""

from illume.critics.base import Critic, CriticInput, Verdict
from illume.critics.fact import FactCritic
from illume.critics.rouge import RougeLCritic, rouge_l

__all__ = ["Critic", "CriticInput", "FactCritic", "RougeLCritic", "Verdict", "rouge_l"]
