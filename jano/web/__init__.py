"""
Stage 1, in: the listener (:mod:`jano.web.site`, twisted.web's server with
Jano's limits) and the Klein app (:mod:`jano.web.app`) that answers Jano's
own routes and sends everything else on to a model.
"""
