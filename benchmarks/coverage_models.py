"""The model families benchmarks/coverage.py tries: tiny random-init builds that need no download.

Each entry: name -> (category, builder). A builder returns (model, example inputs, kind) where kind is
"hf_decoder", "hf" (other Hugging Face models), "tv" (torchvision), "timm" or "tv_det" (torchvision detection:
outputs are post-processed boxes, so outputs are compared on the heads' raw tensors).
"""
from __future__ import annotations

import torch

IN_TESTS = {  # families prunekit's own test files already cover (the target counts the others)
    "tv_resnet18", "tv_mobilenet_v3_small", "tv_efficientnet_b0", "tv_convnext_tiny", "tv_vit", "tv_swin",
    "tv_regnet", "tv_squeezenet", "tv_shufflenet", "tv_mnasnet", "tv_densenet",
    "hf_llama", "hf_qwen2", "hf_gpt2", "hf_opt", "hf_bert", "hf_vit",
    "hf_clip", "hf_convnext", "hf_resnet", "hf_swin", "hf_dinov2", "hf_falcon", "hf_bloom", "hf_gpt_neox",
    "hf_deberta_v2", "hf_mamba", "hf_wav2vec2",
}
FAST = ("tv_resnet18", "hf_gpt_neox", "hf_clip", "hf_mixtral", "hf_swin", "hf_mamba")   # `make test` subset


def _ids(n=8, vocab=100):
    return {"input_ids": torch.randint(0, vocab, (2, n))}


def _ids2():
    return {"input_ids": torch.randint(0, 100, (2, 8)), "decoder_input_ids": torch.randint(0, 100, (2, 4))}


def _pix(s=32, c=3):
    return {"pixel_values": torch.randn(2, c, s, s)}


TXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def _hf(cls_name, cfg_name, inputs, kind="hf", **cfg):
    def build():
        import transformers as T
        return getattr(T, cls_name)(getattr(T, cfg_name)(**cfg)), inputs(), kind
    return build


def _tv(fn, shape=(2, 3, 32, 32), kind="tv", module="torchvision.models", **kw):
    def build():
        import importlib
        m = getattr(importlib.import_module(module), fn)(weights=None, **kw)
        return m, torch.randn(*shape), kind
    return build


def _tv_det(fn, sized=True, **kw):
    def build():
        import torchvision.models.detection as D
        size = dict(min_size=64, max_size=64) if sized else {}     # SSD/SSDLite fix their own input size
        m = getattr(D, fn)(weights=None, weights_backbone=None, **size, **kw)
        return m, ([torch.rand(3, 64, 64)],), "tv_det"      # one argument: the list of images
    return build


def _tv_cls(cls_path, shape, **kw):
    def build():
        import importlib
        mod, _, cls = cls_path.rpartition(".")
        return getattr(importlib.import_module(mod), cls)(**kw), torch.randn(*shape), "tv"
    return build


def _raft():
    """Keyword inputs: a positional (image1, image2) pair would read as (inputs, targets) calibration data.
    128 px: the correlation pyramid needs feature maps of at least 16 (inputs / 8)."""
    import torchvision.models.optical_flow as O
    m = O.raft_small(weights=None, num_flow_updates=2) if "num_flow_updates" in O.raft_small.__code__.co_varnames \
        else O.raft_small(weights=None)
    return m, {"image1": torch.randn(1, 3, 128, 128), "image2": torch.randn(1, 3, 128, 128)}, "tv"


def _timm(name, size=32, **kw):
    def build():
        import timm
        return timm.create_model(name, pretrained=False, num_classes=5, **kw), torch.randn(2, 3, size, size), "timm"
    return build


LLAMA_LIKE = dict(intermediate_size=64, num_key_value_heads=2, **TXT)
SEQ2SEQ = dict(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)
AUDIO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, conv_dim=(16, 16),
             conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
MOE = dict(intermediate_size=48, num_key_value_heads=2, **TXT)

FAMILIES = {
    # torchvision classification
    "tv_resnet18": ("tv classification", _tv("resnet18")),
    "tv_mobilenet_v3_small": ("tv classification", _tv("mobilenet_v3_small")),
    "tv_efficientnet_b0": ("tv classification", _tv("efficientnet_b0")),
    "tv_convnext_tiny": ("tv classification", _tv("convnext_tiny")),
    "tv_regnet": ("tv classification", _tv("regnet_x_400mf")),
    "tv_squeezenet": ("tv classification", _tv("squeezenet1_1", shape=(2, 3, 64, 64))),
    "tv_shufflenet": ("tv classification", _tv("shufflenet_v2_x0_5")),
    "tv_mnasnet": ("tv classification", _tv("mnasnet0_5")),
    "tv_densenet": ("tv classification", _tv("densenet121")),
    "tv_vit": ("tv classification", _tv_cls("torchvision.models.vision_transformer.VisionTransformer",
                                            (2, 3, 32, 32), image_size=32, patch_size=8, num_layers=2,
                                            num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)),
    "tv_swin": ("tv classification", _tv_cls("torchvision.models.swin_transformer.SwinTransformer",
                                             (2, 3, 32, 32), patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                             num_heads=[2, 2], window_size=[4, 4], num_classes=5)),
    "tv_maxvit": ("tv classification", _tv_cls("torchvision.models.maxvit.MaxVit", (1, 3, 64, 64),
                                               input_size=(64, 64), stem_channels=16, partition_size=2,
                                               block_channels=[16, 32], block_layers=[1, 1], head_dim=8,
                                               stochastic_depth_prob=0.0, num_classes=5)),
    "tv_mobilenet_v2": ("tv classification", _tv("mobilenet_v2")),
    "tv_googlenet": ("tv classification", _tv("googlenet", aux_logits=False, init_weights=False)),
    "tv_inception_v3": ("tv classification", _tv("inception_v3", (1, 3, 80, 80), aux_logits=False,
                                                 init_weights=False)),
    "tv_resnext": ("tv classification", _tv("resnext50_32x4d")),
    # torchvision detection / segmentation / video / optical flow
    "tv_fasterrcnn_mobilenet": ("tv detection", _tv_det("fasterrcnn_mobilenet_v3_large_320_fpn")),
    "tv_retinanet": ("tv detection", _tv_det("retinanet_resnet50_fpn")),
    "tv_fcos": ("tv detection", _tv_det("fcos_resnet50_fpn")),
    "tv_ssdlite": ("tv detection", _tv_det("ssdlite320_mobilenet_v3_large", sized=False, num_classes=91)),
    "tv_maskrcnn": ("tv detection", _tv_det("maskrcnn_resnet50_fpn")),
    "tv_keypointrcnn": ("tv detection", _tv_det("keypointrcnn_resnet50_fpn")),
    "tv_deeplabv3_mobilenet": ("tv segmentation", _tv("deeplabv3_mobilenet_v3_large", (1, 3, 64, 64),
                                                       module="torchvision.models.segmentation",
                                                       weights_backbone=None, aux_loss=False)),
    "tv_lraspp": ("tv segmentation", _tv("lraspp_mobilenet_v3_large", (1, 3, 64, 64),
                                         module="torchvision.models.segmentation", weights_backbone=None)),
    "tv_fcn_resnet50": ("tv segmentation", _tv("fcn_resnet50", (1, 3, 64, 64), module="torchvision.models.segmentation",
                                               weights_backbone=None, aux_loss=False)),
    "tv_r3d_18": ("tv video", _tv("r3d_18", (1, 3, 4, 32, 32), module="torchvision.models.video")),
    "tv_s3d": ("tv video", _tv("s3d", (1, 3, 16, 224, 224), module="torchvision.models.video")),  # (2, 7, 7) avgpool
    "tv_r2plus1d_18": ("tv video", _tv("r2plus1d_18", (1, 3, 4, 32, 32), module="torchvision.models.video")),
    "tv_mc3_18": ("tv video", _tv("mc3_18", (1, 3, 4, 32, 32), module="torchvision.models.video")),
    "tv_swin3d": ("tv video", _tv_cls("torchvision.models.video.swin_transformer.SwinTransformer3d",
                                      (1, 3, 4, 32, 32), patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1],
                                      num_heads=[2, 2], window_size=[2, 4, 4], num_classes=5)),
    "tv_raft_small": ("tv optical flow", _raft),
    # timm
    "timm_resnet18": ("timm", _timm("resnet18")),
    "timm_efficientnet_b0": ("timm", _timm("efficientnet_b0")),
    "timm_res2net": ("timm", _timm("res2net50_14w_8s")),
    "timm_cspdarknet": ("timm", _timm("cspdarknet53", size=64)),
    "timm_vit_tiny": ("timm", _timm("vit_tiny_patch16_224", size=32, img_size=32, depth=2)),
    "timm_deit_tiny": ("timm", _timm("deit_tiny_patch16_224", size=32, img_size=32, depth=2)),
    "timm_convnext_atto": ("timm", _timm("convnext_atto")),
    "timm_mobilevit": ("timm", _timm("mobilevit_xxs", size=64)),
    "timm_ghostnet": ("timm", _timm("ghostnet_050")),
    "timm_regnetx": ("timm", _timm("regnetx_002")),
    "timm_mobilenetv3": ("timm", _timm("mobilenetv3_small_050")),
    "timm_repvgg": ("timm", _timm("repvgg_a0")),
    "timm_dla": ("timm", _timm("dla34")),
    "timm_poolformer": ("timm", _timm("poolformer_s12")),
    "timm_resnest": ("timm", _timm("resnest14d")),
    "timm_mixnet": ("timm", _timm("mixnet_s")),
    "timm_efficientvit": ("timm", _timm("efficientvit_b0", size=64)),
    "timm_hrnet": ("timm", _timm("hrnet_w18_small", size=64)),
    # Hugging Face decoders
    "hf_llama": ("hf decoder", _hf("LlamaForCausalLM", "LlamaConfig", _ids, "hf_decoder", **LLAMA_LIKE)),
    "hf_qwen2": ("hf decoder", _hf("Qwen2ForCausalLM", "Qwen2Config", _ids, "hf_decoder", **LLAMA_LIKE)),
    "hf_mistral": ("hf decoder", _hf("MistralForCausalLM", "MistralConfig", _ids, "hf_decoder", **LLAMA_LIKE)),
    "hf_gemma": ("hf decoder", _hf("GemmaForCausalLM", "GemmaConfig", _ids, "hf_decoder", head_dim=8,
                                   **LLAMA_LIKE)),
    "hf_phi": ("hf decoder", _hf("PhiForCausalLM", "PhiConfig", _ids, "hf_decoder", intermediate_size=64, **TXT)),
    "hf_gpt2": ("hf decoder", _hf("GPT2LMHeadModel", "GPT2Config", _ids, "hf_decoder", vocab_size=100, n_embd=32,
                                  n_layer=2, n_head=4, n_positions=32)),
    "hf_opt": ("hf decoder", _hf("OPTForCausalLM", "OPTConfig", _ids, "hf_decoder", ffn_dim=64,
                                 word_embed_proj_dim=32, max_position_embeddings=32, **TXT)),
    "hf_gpt_neox": ("hf decoder", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", _ids, "hf_decoder",
                                      intermediate_size=64, max_position_embeddings=32, **TXT)),
    "hf_bloom": ("hf decoder", _hf("BloomForCausalLM", "BloomConfig", _ids, "hf_decoder", vocab_size=100,
                                   hidden_size=32, n_layer=2, n_head=4)),
    "hf_falcon": ("hf decoder", _hf("FalconForCausalLM", "FalconConfig", _ids, "hf_decoder",
                                    new_decoder_architecture=True, num_kv_heads=2, **TXT)),
    "hf_gptj": ("hf decoder", _hf("GPTJForCausalLM", "GPTJConfig", _ids, "hf_decoder", vocab_size=100, n_embd=32,
                                  n_layer=2, n_head=4, rotary_dim=4, n_positions=32)),
    "hf_gemma2": ("hf decoder", _hf("Gemma2ForCausalLM", "Gemma2Config", _ids, "hf_decoder", head_dim=8,
                                    sliding_window=4, **LLAMA_LIKE)),
    "hf_qwen3": ("hf decoder", _hf("Qwen3ForCausalLM", "Qwen3Config", _ids, "hf_decoder", head_dim=8, **LLAMA_LIKE)),
    "hf_phi3": ("hf decoder", _hf("Phi3ForCausalLM", "Phi3Config", _ids, "hf_decoder", pad_token_id=0,
                                  **LLAMA_LIKE)),
    "hf_starcoder2": ("hf decoder", _hf("Starcoder2ForCausalLM", "Starcoder2Config", _ids, "hf_decoder",
                                        **LLAMA_LIKE)),
    "hf_gpt_bigcode": ("hf decoder", _hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", _ids, "hf_decoder",
                                         vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                         multi_query=True)),
    "hf_stablelm": ("hf decoder", _hf("StableLmForCausalLM", "StableLmConfig", _ids, "hf_decoder", **LLAMA_LIKE)),
    "hf_olmo2": ("hf decoder", _hf("Olmo2ForCausalLM", "Olmo2Config", _ids, "hf_decoder", **LLAMA_LIKE)),
    "hf_cohere": ("hf decoder", _hf("CohereForCausalLM", "CohereConfig", _ids, "hf_decoder", **LLAMA_LIKE)),
    # encoders
    "hf_bert": ("hf encoder", _hf("BertModel", "BertConfig", _ids, intermediate_size=64, **TXT)),
    "hf_roberta": ("hf encoder", _hf("RobertaModel", "RobertaConfig", _ids, intermediate_size=64,
                                     max_position_embeddings=40, pad_token_id=1, **TXT)),
    "hf_distilbert": ("hf encoder", _hf("DistilBertModel", "DistilBertConfig", _ids, vocab_size=100, dim=32,
                                        n_layers=2, n_heads=4, hidden_dim=64)),
    "hf_deberta_v2": ("hf encoder", _hf("DebertaV2Model", "DebertaV2Config", _ids, intermediate_size=64,
                                        max_position_embeddings=32, **TXT)),
    "hf_electra": ("hf encoder", _hf("ElectraModel", "ElectraConfig", _ids, intermediate_size=64,
                                     embedding_size=32, **TXT)),
    "hf_albert": ("hf encoder", _hf("AlbertModel", "AlbertConfig", _ids, intermediate_size=64, embedding_size=16,
                                    **TXT)),
    "hf_mpnet": ("hf encoder", _hf("MPNetModel", "MPNetConfig", _ids, intermediate_size=64, **TXT)),
    "hf_modernbert": ("hf encoder", _hf("ModernBertModel", "ModernBertConfig", _ids, intermediate_size=64,
                                        pad_token_id=0, **TXT)),
    # seq2seq
    "hf_t5": ("hf seq2seq", _hf("T5ForConditionalGeneration", "T5Config",
                                lambda: {"input_ids": torch.randint(0, 100, (2, 8)),
                                         "decoder_input_ids": torch.randint(0, 100, (2, 4))}, "hf_seq2seq",
                                vocab_size=100, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4)),
    "hf_bart": ("hf seq2seq", _hf("BartForConditionalGeneration", "BartConfig",
                                  lambda: {"input_ids": torch.randint(0, 100, (2, 8)),
                                           "decoder_input_ids": torch.randint(0, 100, (2, 4))}, "hf_seq2seq",
                                  vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32)),
    "hf_pegasus": ("hf seq2seq", _hf("PegasusForConditionalGeneration", "PegasusConfig", _ids2, "hf_seq2seq",
                                     **SEQ2SEQ)),
    "hf_marian": ("hf seq2seq", _hf("MarianMTModel", "MarianConfig", _ids2, "hf_seq2seq", pad_token_id=0,
                                    decoder_start_token_id=0, **SEQ2SEQ)),
    "hf_whisper": ("hf seq2seq", _hf("WhisperForConditionalGeneration", "WhisperConfig",
                                     lambda: {"input_features": torch.randn(2, 16, 32),
                                              "decoder_input_ids": torch.randint(0, 100, (2, 4))}, "hf_seq2seq",
                                     num_mel_bins=16, max_source_positions=16, max_target_positions=16,
                                     pad_token_id=0, bos_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                     **SEQ2SEQ)),
    # vision / audio
    "hf_vit": ("hf vision", _hf("ViTForImageClassification", "ViTConfig", _pix, intermediate_size=64,
                                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                patch_size=8, num_labels=3)),
    "hf_convnext": ("hf vision", _hf("ConvNextForImageClassification", "ConvNextConfig", lambda: _pix(64),
                                     hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_labels=3)),
    "hf_resnet": ("hf vision", _hf("ResNetForImageClassification", "ResNetConfig", lambda: _pix(64),
                                   hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], embedding_size=16,
                                   num_labels=3)),
    "hf_swin": ("hf vision", _hf("SwinForImageClassification", "SwinConfig", _pix, image_size=32, patch_size=4,
                                 embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=3)),
    "hf_dinov2": ("hf vision", _hf("Dinov2Model", "Dinov2Config", _pix, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)),
    "hf_segformer": ("hf vision", _hf("SegformerForSemanticSegmentation", "SegformerConfig", lambda: _pix(64),
                                      num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                      num_attention_heads=[1, 2], decoder_hidden_size=32, num_labels=3,
                                      patch_sizes=[7, 3], strides=[4, 2])),
    "hf_deit": ("hf vision", _hf("DeiTForImageClassification", "DeiTConfig", _pix, intermediate_size=64,
                                 hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                 patch_size=8, num_labels=3)),
    "hf_beit": ("hf vision", _hf("BeitForImageClassification", "BeitConfig", _pix, intermediate_size=64,
                                 hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                 patch_size=8, num_labels=3, use_relative_position_bias=True)),
    "hf_convnextv2": ("hf vision", _hf("ConvNextV2ForImageClassification", "ConvNextV2Config", lambda: _pix(64),
                                       hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_labels=3)),
    "hf_mobilevit": ("hf vision", _hf("MobileViTForImageClassification", "MobileViTConfig", lambda: _pix(64),
                                      image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24,
                                                                                               32, 64], num_labels=3)),
    "hf_efficientnet": ("hf vision", _hf("EfficientNetForImageClassification", "EfficientNetConfig",
                                         lambda: _pix(64), image_size=64, width_coefficient=1.0,
                                         depth_coefficient=0.5, hidden_dim=1280, num_labels=3)),
    "hf_yolos": ("hf vision", _hf("YolosForObjectDetection", "YolosConfig", _pix, intermediate_size=64,
                                  hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=[32, 32],
                                  patch_size=8, num_detection_tokens=5, num_labels=3)),
    "hf_wav2vec2": ("hf audio", _hf("Wav2Vec2Model", "Wav2Vec2Config",
                                    lambda: {"input_values": torch.randn(2, 1600)}, hidden_size=32,
                                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)),
    "hf_hubert": ("hf audio", _hf("HubertModel", "HubertConfig", lambda: {"input_values": torch.randn(2, 1600)},
                                  **AUDIO)),
    "hf_wavlm": ("hf audio", _hf("WavLMModel", "WavLMConfig", lambda: {"input_values": torch.randn(2, 1600)},
                                 num_buckets=16, max_bucket_distance=32, **AUDIO)),
    "hf_ast": ("hf audio", _hf("ASTForAudioClassification", "ASTConfig",
                               lambda: {"input_values": torch.randn(2, 64, 16)}, hidden_size=32,
                               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_length=64,
                               num_mel_bins=16, patch_size=8, frequency_stride=8, time_stride=8, num_labels=3)),
    # multimodal
    "hf_clip": ("hf multimodal", _hf("CLIPModel", "CLIPConfig",
                                     lambda: {"input_ids": torch.randint(0, 100, (2, 8)),
                                              "pixel_values": torch.randn(2, 3, 32, 32)},
                                     text_config=dict(intermediate_size=64, max_position_embeddings=16,
                                                      bos_token_id=0, eos_token_id=1, pad_token_id=1, **TXT),
                                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, image_size=32, patch_size=8),
                                     projection_dim=16)),
    "hf_siglip": ("hf multimodal", _hf("SiglipModel", "SiglipConfig",
                                       lambda: {"input_ids": torch.randint(0, 100, (2, 8)),
                                                "pixel_values": torch.randn(2, 3, 32, 32)},
                                       text_config=dict(intermediate_size=64, max_position_embeddings=16, **TXT),
                                       vision_config=dict(hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          image_size=32, patch_size=8))),
    "hf_owlvit": ("hf multimodal", _hf("OwlViTModel", "OwlViTConfig",
                                       lambda: {"input_ids": torch.randint(0, 100, (2, 8)),
                                                "pixel_values": torch.randn(2, 3, 32, 32)},
                                       text_config=dict(intermediate_size=64, max_position_embeddings=16, **TXT),
                                       vision_config=dict(hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          image_size=32, patch_size=8), projection_dim=16)),
    # mixture of experts
    "hf_mixtral": ("hf moe", _hf("MixtralForCausalLM", "MixtralConfig", _ids, "hf_decoder", num_local_experts=4,
                                 num_experts_per_tok=2, **MOE)),
    "hf_qwen2_moe": ("hf moe", _hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", _ids, "hf_decoder", num_experts=4,
                                   num_experts_per_tok=2, moe_intermediate_size=16,
                                   shared_expert_intermediate_size=32, **MOE)),
    "hf_qwen3_moe": ("hf moe", _hf("Qwen3MoeForCausalLM", "Qwen3MoeConfig", _ids, "hf_decoder", num_experts=4,
                                   num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, **MOE)),
    "hf_olmoe": ("hf moe", _hf("OlmoeForCausalLM", "OlmoeConfig", _ids, "hf_decoder", num_experts=4,
                               num_experts_per_tok=2, **MOE)),
    "hf_granitemoe": ("hf moe", _hf("GraniteMoeForCausalLM", "GraniteMoeConfig", _ids, "hf_decoder",
                                    num_local_experts=4, num_experts_per_tok=2, **MOE)),
    "hf_phimoe": ("hf moe", _hf("PhimoeForCausalLM", "PhimoeConfig", _ids, "hf_decoder", num_local_experts=4,
                                num_experts_per_tok=2, **MOE)),
    # state space
    "hf_mamba": ("hf ssm", _hf("MambaForCausalLM", "MambaConfig", _ids, "hf_decoder", vocab_size=100,
                               hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4)),
    "hf_mamba2": ("hf ssm", _hf("Mamba2ForCausalLM", "Mamba2Config", _ids, "hf_decoder", vocab_size=100,
                                hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4,
                                num_heads=8, head_dim=8, n_groups=1, chunk_size=8)),
    "hf_falcon_mamba": ("hf ssm", _hf("FalconMambaForCausalLM", "FalconMambaConfig", _ids, "hf_decoder",
                                      vocab_size=100, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                                      conv_kernel=4)),
    "hf_jamba": ("hf ssm", _hf("JambaForCausalLM", "JambaConfig", _ids, "hf_decoder", num_experts=4,
                               num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                               expert_layer_offset=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
                               use_mamba_kernels=False, **MOE)),
    "hf_rwkv": ("hf ssm", _hf("RwkvForCausalLM", "RwkvConfig", _ids, "hf_decoder", vocab_size=100, hidden_size=32,
                              num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64,
                              context_length=32)),
}

