"""Mitogen's linear strategy, found through the installed ansible_mitogen package.

Under TCG every plain Ansible task re-imports ansible's module_utils in the guest (~9 s of
emulated CPU per task and host); Mitogen keeps one interpreter per host and runs tasks in ~1 s.
"""

from ansible.plugins.strategy.linear import StrategyModule as LinearStrategy
from ansible_mitogen.strategy import StrategyMixin


class StrategyModule(StrategyMixin, LinearStrategy):
    pass
