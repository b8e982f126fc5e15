from protege.policies.base import Policy, build_policy, shape_meta_from_buffer

__all__ = ["Policy", "build_policy", "shape_meta_from_buffer"]
