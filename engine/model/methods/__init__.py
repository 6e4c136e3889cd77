"""How each projection's weights are stored, prepared and applied, chosen once at load.

`base` holds the two method interfaces (`LinearMethod`, `ExpertsMethod`); `plain` the unquantized
methods; `selection` the frozen `WeightMethods` object that says which method each module gets and the
registry where a checkpoint format (a `quantization_config.quant_method`) plugs in.
"""
