"""Write a diffusers SD 1.x pipeline's weights in the original single-file layout (the test's own transcription
of the original Stable Diffusion key names)."""

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict) -> str:
    for a, b in table.items():
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def unet_keys(unet) -> dict:
    lpb = unet.config.layers_per_block
    out = {}
    for key, value in unet.state_dict().items():
        p = key.split(".")
        if p[0] == "time_embedding":
            new = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[p[1]] + "." + ".".join(p[2:])
        elif p[0] == "add_embedding":
            new = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}[p[1]] + "." + ".".join(p[2:])
        elif p[0] == "conv_in":
            new = "input_blocks.0.0." + ".".join(p[1:])
        elif p[0] == "conv_norm_out":
            new = "out.0." + ".".join(p[1:])
        elif p[0] == "conv_out":
            new = "out.2." + ".".join(p[1:])
        elif p[0] == "down_blocks":
            i = int(p[1])
            if p[2] == "downsamplers":
                new = f"input_blocks.{(lpb + 1) * (i + 1)}.0.op." + ".".join(p[5:])
            else:
                j, rest = int(p[3]), ".".join(p[4:])
                slot = 0 if p[2] == "resnets" else 1
                new = f"input_blocks.{(lpb + 1) * i + j + 1}.{slot}." + (_rename(rest, _RESNET) if slot == 0 else rest)
        elif p[0] == "mid_block":
            j, rest = int(p[2]), ".".join(p[3:])
            if p[1] == "resnets":
                new = f"middle_block.{2 * j}." + _rename(rest, _RESNET)
            else:
                new = "middle_block.1." + rest
        elif p[0] == "up_blocks":
            i = int(p[1])
            if p[2] == "upsamplers":
                has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in unet.state_dict())
                new = f"output_blocks.{(lpb + 1) * i + lpb}.{2 if has_attn else 1}.conv." + ".".join(p[5:])
            else:
                j, rest = int(p[3]), ".".join(p[4:])
                slot = 0 if p[2] == "resnets" else 1
                new = f"output_blocks.{(lpb + 1) * i + j}.{slot}." + (_rename(rest, _RESNET) if slot == 0 else rest)
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def vae_keys(vae) -> dict:
    n = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        p = key.split(".")
        new = key
        if p[0] in ("encoder", "decoder") and len(p) > 1:
            side, rest = p[0], p[1:]
            if rest[0] == "conv_norm_out":
                new = f"{side}.norm_out." + ".".join(rest[1:])
            elif rest[0] in ("down_blocks", "up_blocks"):
                i = int(rest[1])
                level = i if side == "encoder" else n - 1 - i
                word = "down" if side == "encoder" else "up"
                if rest[2] in ("downsamplers", "upsamplers"):
                    new = f"{side}.{word}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv." + \
                        ".".join(rest[5:])
                else:
                    tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
                    new = f"{side}.{word}.{level}.block.{rest[3]}.{tail}"
            elif rest[0] == "mid_block":
                if rest[1] == "resnets":
                    new = f"{side}.mid.block_{int(rest[2]) + 1}." + ".".join(rest[3:]).replace("conv_shortcut",
                                                                                             "nin_shortcut")
                else:
                    new = f"{side}.mid.attn_1." + _rename(".".join(rest[3:]), _VAE_ATTN)
                    if value.ndim == 2:
                        value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def sd1_original(pipe) -> dict:
    state = {**unet_keys(pipe.unet), **vae_keys(pipe.vae)}
    for k, v in pipe.text_encoder.state_dict().items():
        state["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return {k: v.contiguous().clone() for k, v in state.items()}
