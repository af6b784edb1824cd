# The ACmix mixing rates (rate1 and rate2 of every ACmix op) take no weight
# decay, as in the official ImageNet training, which decays no 1-d
# parameter. A config lists this file among its bases and adds the keys to
# its recipe's own:
#   optim_wrapper = dict(paramwise_cfg=dict(custom_keys=_base_.acmix_no_decay))
acmix_no_decay = {
    'rate1': dict(decay_mult=0.0),
    'rate2': dict(decay_mult=0.0),
}
