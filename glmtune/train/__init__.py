"""The training stage.

``glmtune.train`` is both this package and the README's one-call API
(``glmtune.train(config)``). Python rebinds ``glmtune.train`` to this package
the first time any ``glmtune.train.*`` module is imported, so a plain function
of that name in ``glmtune/__init__.py`` would stop working after its own first
call. Making the package itself callable keeps both meanings true at once.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, config, callbacks=()):
        from glmtune.train.recipe import train

        return train(config, callbacks)


sys.modules[__name__].__class__ = _CallablePackage
