"""Ignite event handlers that add federated sync, privacy and leakage evaluation to a MONAI trainer."""

from monai_fedpriv.handlers.attack_evaluator import ReconstructionAttackEvaluator
from monai_fedpriv.handlers.federated_sync import FederatedSync
from monai_fedpriv.handlers.privacy_budget import PrivacyBudgetHandler
from monai_fedpriv.handlers.private_model import PrivateModelSaver

__all__ = ["FederatedSync", "PrivacyBudgetHandler", "PrivateModelSaver", "ReconstructionAttackEvaluator"]
