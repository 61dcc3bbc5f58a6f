"""The papers behind the methods, as BibTeX, so that a user can cite what they ran.

Each wrapper names its papers in the class attribute ``papers`` and carries their BibTeX
in ``bibtex``; :func:`gradsurgery.cite` adds the entry of the library itself:

>>> from gradsurgery import PCGrad
>>> PCGrad.papers[0].reference
'Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020'
"""

# ruff: noqa: E501 (one BibTeX field per line, however long)

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CHAUDHRY_2019",
    "EFIMOV_2022",
    "GUO_2023",
    "KORNBLITH_2019",
    "LIU_2021",
    "LOPEZ_PAZ_2017",
    "MAO_2022",
    "PAPERS",
    "SENER_2018",
    "WANG_2021",
    "YU_2020",
    "Paper",
]


@dataclass(frozen=True)
class Paper:
    """A paper: its BibTeX key, a one-line reference and the BibTeX entry."""

    key: str
    reference: str
    bibtex: str


LIU_2021 = Paper(
    "liu-etal-2021-preserving",
    "Liu et al., Preserving Cross-Linguality of Pre-trained Models via Continual Learning, "
    "RepL4NLP 2021",
    """@inproceedings{liu-etal-2021-preserving,
  title     = {Preserving Cross-Linguality of Pre-trained Models via Continual Learning},
  author    = {Liu, Zihan and Winata, Genta Indra and Madotto, Andrea and Fung, Pascale},
  booktitle = {Proceedings of the 6th Workshop on Representation Learning for NLP (RepL4NLP-2021)},
  pages     = {64--71},
  year      = {2021},
  publisher = {Association for Computational Linguistics}
}""",
)

LOPEZ_PAZ_2017 = Paper(
    "lopez-paz-ranzato-2017-gem",
    "Lopez-Paz and Ranzato, Gradient Episodic Memory for Continual Learning, NeurIPS 2017",
    """@inproceedings{lopez-paz-ranzato-2017-gem,
  title     = {Gradient Episodic Memory for Continual Learning},
  author    = {Lopez-Paz, David and Ranzato, Marc'Aurelio},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2017}
}""",
)

CHAUDHRY_2019 = Paper(
    "chaudhry-etal-2019-agem",
    "Chaudhry et al., Efficient Lifelong Learning with A-GEM, ICLR 2019",
    """@inproceedings{chaudhry-etal-2019-agem,
  title     = {Efficient Lifelong Learning with {A-GEM}},
  author    = {Chaudhry, Arslan and Ranzato, Marc'Aurelio and Rohrbach, Marcus and Elhoseiny, Mohamed},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2019}
}""",
)

MAO_2022 = Paper(
    "mao-etal-2022-less",
    "Mao et al., Less-Forgetting Multi-Lingual Fine-Tuning, NeurIPS 2022",
    """@inproceedings{mao-etal-2022-less,
  title     = {Less-Forgetting Multi-Lingual Fine-Tuning},
  author    = {Mao, Yuren and Liang, Yaobo and Duan, Nan and Wang, Haobo and Wang, Kai and Chen, Lu and Gao, Yunjun},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2022}
}""",
)

YU_2020 = Paper(
    "yu-etal-2020-pcgrad",
    "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020",
    """@inproceedings{yu-etal-2020-pcgrad,
  title     = {Gradient Surgery for Multi-Task Learning},
  author    = {Yu, Tianhe and Kumar, Saurabh and Gupta, Abhishek and Levine, Sergey and Hausman, Karol and Finn, Chelsea},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2020}
}""",
)

WANG_2021 = Paper(
    "wang-etal-2021-gradvac",
    "Wang et al., Gradient Vaccine: Investigating and Improving Multi-task Optimization in "
    "Massively Multilingual Models, ICLR 2021",
    """@inproceedings{wang-etal-2021-gradvac,
  title     = {Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively Multilingual Models},
  author    = {Wang, Zirui and Tsvetkov, Yulia and Firat, Orhan and Cao, Yuan},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2021}
}""",
)

SENER_2018 = Paper(
    "sener-koltun-2018-mgda",
    "Sener and Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018",
    """@inproceedings{sener-koltun-2018-mgda,
  title     = {Multi-Task Learning as Multi-Objective Optimization},
  author    = {Sener, Ozan and Koltun, Vladlen},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2018}
}""",
)

GUO_2023 = Paper(
    "guo-etal-2023-analyzing",
    "Guo et al., Analyzing and Reducing the Performance Gap in Cross-Lingual Transfer with "
    "Fine-tuning Slow and Fast, ACL 2023",
    """@inproceedings{guo-etal-2023-analyzing,
  title     = {Analyzing and Reducing the Performance Gap in Cross-Lingual Transfer with Fine-tuning Slow and Fast},
  author    = {Guo, Yiduo and Liang, Yaobo and Zhao, Dongyan and Liu, Bing and Duan, Nan},
  booktitle = {Proceedings of the 61st Annual Meeting of the Association for Computational Linguistics (Volume 1: Long Papers)},
  pages     = {4002--4017},
  year      = {2023},
  publisher = {Association for Computational Linguistics},
  doi       = {10.18653/v1/2023.acl-long.221}
}""",
)

EFIMOV_2022 = Paper(
    "efimov-etal-2022-impact",
    "Efimov et al., The Impact of Cross-Lingual Adjustment of Contextual Word Representations "
    "on Zero-Shot Transfer, arXiv 2204.06457 (2022)",
    """@misc{efimov-etal-2022-impact,
  title         = {The Impact of Cross-Lingual Adjustment of Contextual Word Representations on Zero-Shot Transfer},
  author        = {Efimov, Pavel and Boytsov, Leonid and Arslanova, Elena and Braslavski, Pavel},
  year          = {2022},
  eprint        = {2204.06457},
  archivePrefix = {arXiv}
}""",
)

KORNBLITH_2019 = Paper(
    "kornblith-etal-2019-similarity",
    "Kornblith et al., Similarity of Neural Network Representations Revisited, ICML 2019",
    """@inproceedings{kornblith-etal-2019-similarity,
  title     = {Similarity of Neural Network Representations Revisited},
  author    = {Kornblith, Simon and Norouzi, Mohammad and Lee, Honglak and Hinton, Geoffrey},
  booktitle = {Proceedings of the 36th International Conference on Machine Learning},
  series    = {Proceedings of Machine Learning Research},
  volume    = {97},
  year      = {2019}
}""",
)

PAPERS: tuple[Paper, ...] = (
    LIU_2021,
    LOPEZ_PAZ_2017,
    CHAUDHRY_2019,
    MAO_2022,
    YU_2020,
    WANG_2021,
    SENER_2018,
    GUO_2023,
    KORNBLITH_2019,
    EFIMOV_2022,
)
"""Every paper the library implements or builds on, in the order of the documentation."""
