"""Build OmniV-Med checkpoints: complete Hub folders (code, config, weights, processor, tokenizer, chat template).

This part: `build_tiny_tokenizer`, an offline byte-level BPE for tiny test models (no download, deterministic).
"""

import random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from omnivmed.processing_omnivmed import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    FRAME_TOKEN,
    IM_END,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    VISION_END,
    VISION_START,
)


# Qwen2's pre-tokenizer split (the tiny tokenizer behaves like Qwen2's on whitespace, digits and punctuation)
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# A small English medical corpus for the tiny tokenizer (radiology, pathology, surgery, endoscopy, QA).
TINY_CORPUS = """\
The chest radiograph shows no focal consolidation, pleural effusion or pneumothorax.
Heart size is within normal limits and the mediastinal contours are unremarkable.
There is a small left pleural effusion with adjacent basilar atelectasis.
Axial CT of the abdomen demonstrates a hypodense lesion in segment VII of the liver.
The lesion measures 2.3 x 1.8 cm and shows peripheral nodular enhancement.
Findings are most consistent with a hepatic hemangioma.
MRI of the brain shows a T2 hyperintense lesion in the right frontal lobe.
There is no restricted diffusion, mass effect or midline shift.
The ventricles and sulci are appropriate for the patient's age.
Contrast-enhanced CT of the chest reveals a filling defect in the right lower lobe pulmonary artery.
Impression: acute pulmonary embolism without right heart strain.
A 6 mm solid nodule is seen in the left upper lobe; follow-up CT in 12 months is recommended.
Ground-glass opacities are present bilaterally in a peripheral distribution.
The appendix is dilated to 11 mm with periappendiceal fat stranding.
No free air or drainable fluid collection is identified.
The kidneys are normal in size with no hydronephrosis or calculi.
A simple cyst is noted in the upper pole of the left kidney.
The pancreas is atrophic with a dilated main pancreatic duct.
Ultrasound of the gallbladder shows multiple mobile echogenic stones with posterior acoustic shadowing.
The common bile duct measures 4 mm, which is normal.
Mammography demonstrates scattered areas of fibroglandular density.
There is an irregular spiculated mass in the upper outer quadrant of the right breast, BI-RADS 5.
Knee MRI shows a complex tear of the posterior horn of the medial meniscus.
The anterior cruciate ligament is intact.
There is a nondisplaced fracture of the distal radius.
Degenerative changes are present at L4-L5 with moderate foraminal narrowing.
The thyroid gland is enlarged with a dominant nodule in the right lobe.
PET-CT shows intense FDG uptake in the mediastinal lymph nodes.
The sagittal slice shows a compression fracture of the T12 vertebral body.
On the coronal reconstruction the aortic root is dilated to 4.6 cm.
Echocardiography shows a left ventricular ejection fraction of 35 percent.
The frontal view shows an endotracheal tube 4 cm above the carina.
A right internal jugular central venous catheter terminates in the superior vena cava.
Histopathology shows invasive ductal carcinoma, grade 2, with lymphovascular invasion.
The tumor cells are arranged in nests and cords within a desmoplastic stroma.
Immunohistochemistry is positive for estrogen receptor and negative for HER2.
The biopsy shows chronic gastritis with Helicobacter pylori organisms.
Sections show colonic mucosa with a tubular adenoma and low-grade dysplasia.
The margins of resection are free of tumor.
There is extensive necrosis and a high mitotic rate.
Hematoxylin and eosin staining reveals granulomas with central caseation.
The skin biopsy shows a melanocytic lesion with irregular nests at the dermoepidermal junction.
Frozen section confirms metastatic adenocarcinoma in the sentinel lymph node.
The patient underwent laparoscopic cholecystectomy without complications.
The surgeon identifies the cystic duct and the cystic artery before clipping.
In this frame the grasper retracts the gallbladder fundus toward the right shoulder.
The critical view of safety is achieved before division of the cystic structures.
Bleeding from the liver bed is controlled with electrocautery.
The specimen is placed in a retrieval bag and removed through the umbilical port.
During colonoscopy a 1 cm sessile polyp was found in the ascending colon.
The polyp was removed by cold snare polypectomy.
Endoscopy shows erosive esophagitis, Los Angeles grade B.
The duodenal bulb and second portion of the duodenum are normal.
Video frames show the instrument approaching the target tissue.
The scope is withdrawn and the procedure is complete.
Question: Is there a pneumothorax in this image?
Answer: No, there is no pneumothorax.
Question: Which organ shows the abnormality?
Answer: The liver shows a hypodense lesion.
Question: What imaging modality was used?
Answer: This is an axial CT scan with intravenous contrast.
Question: Is the lesion benign or malignant?
Answer: The features favor a benign lesion, but correlation with prior imaging is advised.
Question: In which slice is the mass largest?
Answer: The mass is largest on slice 23 of the axial series.
Question: What is the plane of this MRI image?
Answer: The image is in the sagittal plane.
Question: Describe the findings in this pathology slide.
Answer: The slide shows sheets of atypical cells with prominent nucleoli.
Question: What happens in the video between 10 and 20 seconds?
Answer: The surgeon dissects the hepatocystic triangle.
Question: Are the lungs clear?
Answer: Yes, the lungs are clear.
Question: How many nodules are visible?
Answer: Two nodules are visible in the right lung.
Please describe this chest X-ray.
Write the radiology report for this CT volume.
Summarize the key findings and give an impression.
Compare the current study with the prior examination.
The findings are stable compared with the examination from last year.
Interval increase in size of the right hilar mass.
There has been interval resolution of the left lower lobe pneumonia.
Recommend clinical correlation and follow-up imaging.
The study is limited by motion artifact.
Bone windows show no lytic or sclerotic lesion.
Lung windows show centrilobular emphysema in the upper lobes.
The soft tissue window shows a heterogeneous enhancing mass.
The Hounsfield units of the lesion measure 45 before and 110 after contrast.
Diffusion-weighted imaging shows an acute infarct in the left middle cerebral artery territory.
There is a subdural hematoma along the right convexity measuring 8 mm.
The optic nerves and chiasm are normal.
Fundus photography shows microaneurysms and hard exudates consistent with diabetic retinopathy.
The optical coherence tomography shows subretinal fluid.
Dermoscopy shows an atypical pigment network with regression structures.
The fetal ultrasound shows a single live intrauterine pregnancy.
The estimated fetal weight is appropriate for gestational age.
The patient is a 64-year-old man with cough and fever for three days.
The patient is a 45-year-old woman with abdominal pain and jaundice.
History: trauma after a motor vehicle collision.
Technique: multiplanar multisequence MRI without and with gadolinium.
Comparison: none available.
Clinical indication: rule out appendicitis.
"""

_TEMPLATES = [
    "The {organ} measures {n}.{d} cm on the {plane} {series}.",
    "Slice {n} of {m} shows the {organ} at a spacing of {d}.{n} mm.",
    "At {n} seconds the camera shows the {organ}.",
    "Question: What is abnormal in the {organ}? Answer: a {n} mm {finding}.",
]
_FILL = {
    "organ": ["liver", "spleen", "lung", "kidney", "heart", "brain", "pancreas", "colon", "aorta", "gallbladder"],
    "plane": ["axial", "sagittal", "coronal"],
    "series": ["CT", "MRI", "ultrasound", "PET-CT", "radiograph"],
    "finding": ["nodule", "cyst", "mass", "lesion", "calcification", "polyp"],
}


def _tiny_corpus_lines(seed: int) -> list[str]:
    """The built-in corpus plus seed-dependent templated lines (numbers, organs, planes) in a seed-dependent order."""
    rng = random.Random(seed)
    lines = TINY_CORPUS.strip().splitlines()
    for _ in range(200):
        template = rng.choice(_TEMPLATES)
        lines.append(
            template.format(
                organ=rng.choice(_FILL["organ"]),
                plane=rng.choice(_FILL["plane"]),
                series=rng.choice(_FILL["series"]),
                finding=rng.choice(_FILL["finding"]),
                n=rng.randint(1, 99),
                m=rng.randint(100, 300),
                d=rng.randint(0, 9),
            )
        )
    rng.shuffle(lines)
    return lines


def build_tiny_tokenizer(seed: int = 0, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A Qwen2-like byte-level BPE trained offline on a built-in medical corpus.

    Special tokens (fixed ids 0..6): <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos: this is a chat tokenizer),
    <|vision_start|>, <|vision_end|>, <|image_pad|>, <|frame_sep|>. Padding on the left (generation). Carries the
    OmniV-Med chat template. Same seed and vocab_size -> byte-identical tokenizer.json. The tokenizer has exactly
    `vocab_size` tokens up to about 1700 (beyond that the corpus runs out of merges; check `len(tokenizer)`).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,  # every pair may merge: the small corpus fills vocab_size
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tiny_corpus_lines(seed), trainer=trainer)
    for index, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != index:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {index}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        extra_special_tokens={
            "image_token": IMAGE_TOKEN,
            "frame_token": FRAME_TOKEN,
            "vision_start_token": VISION_START,
            "vision_end_token": VISION_END,
        },
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )


# model building: added by the foundation work
