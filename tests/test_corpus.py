"""Corpus maker pieces that need no TTS engine: normalisation, quiz parsing, texts, plan, augmentation, scripts."""
import dataclasses
import random
import re
import shutil

import numpy as np
import pytest

from src.corpus.augment import Augmentation, add_noise, apply_augmentation, draw_augmentation
from src.corpus.conversations import expected_states, pad_to_slices, split_at_pause
from src.corpus.normalize import is_normalised, number_to_words, ordinal_words, spoken_form, transcript
from src.corpus.plan import KINDS, PlanOptions, apportion, plan_corpus, words_before_cut
from src.corpus.quiz import BUILTIN_FACTS, canonical, load_facts
from src.corpus.render import cut_speech, set_peak, speech_bounds
from src.corpus.texts import arithmetic_qa, make_qa, units_qa
from src.prompts import IGNORE, IGNORE_REPLIES, INCOMPLETE, INCOMPLETE_REPLIES, RESPONSE

VOICES = {"flite": ["slt", "rms", "awb", "kal16"], "espeak": ["en-us+m3", "en-gb+f3", "en-us+f2"], "piper": ["joe"]}

_UNITS = {w: i for i, w in enumerate(number_to_words(i) for i in range(20))}
_UNITS.update({w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split())
               if i >= 2})


def words_to_number(words: str) -> int:
    """Inverse of number_to_words (test oracle, written independently of it)."""
    total, current = 0, 0
    for word in words.split():
        if word == "hundred":
            current *= 100
        elif word in ("thousand", "million"):
            total += current * (1000 if word == "thousand" else 10**6)
            current = 0
        else:
            current += _UNITS[word]
    return total + current


@pytest.mark.parametrize("n", [0, 7, 13, 20, 40, 45, 99, 100, 101, 110, 999, 1000, 1001, 12345, 700000, 1234567])
def test_number_words_round_trip(n):
    assert words_to_number(number_to_words(n)) == n


def test_number_words_known_spellings():
    assert number_to_words(1789) == "one thousand seven hundred eighty nine"
    assert number_to_words(-3) == "minus three"
    assert [ordinal_words(n) for n in (1, 2, 3, 5, 12, 21, 40, 100)] == [
        "first", "second", "third", "fifth", "twelfth", "twenty first", "fortieth", "one hundredth"]


@pytest.mark.parametrize("written, label", [
    ("What is 7 + 5?", "what is seven plus five"),
    ("It costs $3.50, about 20% more.", "it costs three dollars and fifty cents about twenty percent more"),
    ("The 21st guest arrived at 9.", "the twenty first guest arrived at nine"),
    ("Bogotá is in Colombia — St. John's isn't.", "bogota is in colombia saint john's isn't"),
    ("Washington DC, USA", "washington d c u s a"),
    ("12 × 3 = 36", "twelve times three equals thirty six"),
    ("snake_case and 3.14", "snake case and three point one four"),
])
def test_transcripts_spell_out_numbers_and_symbols(written, label):
    assert transcript(written) == label
    assert is_normalised(label)


def test_spoken_form_keeps_prosody_marks_but_has_no_digits():
    spoken = spoken_form("Is 1,000 more than 999?")
    assert spoken == "Is one thousand more than nine hundred ninety nine?"
    assert not re.search(r"\d", spoken_form("In 1492, 3 ships and 90 men sailed 4,000 km at 6.5 knots."))


@pytest.mark.parametrize("bad", ["", "Hello", "two  spaces", "digit 7", "'quoted'", "under_score", "comma,"])
def test_is_normalised_rejects_unnormalised_labels(bad):
    assert not is_normalised(bad)


@pytest.mark.parametrize("pattern, plain", [
    ("Cal{if{ornia}}|CA", "California"),
    ("{DR |Democratic Republic of the }Congo", "Democratic Republic of the Congo"),
    ("S[~a|a~|a]o Tom['e|e'|e] and Pr['i|i'|i]ncipe", "Sao Tome and Principe"),
    ("Bra[z|s]il", "Brazil"),
    ("forget{-| }me{-| }not", "forget-me-not"),
    ("Newfoundland{ and Labrador}", "Newfoundland and Labrador"),
])
def test_quiz_patterns_have_one_plain_reading(pattern, plain):
    assert canonical(pattern) == plain


def test_quiz_files_are_parsed_and_builtin_is_the_fallback(tmp_path):
    (tmp_path / "africa").write_text("Kenya:Nairobi\nC[^o|o^|o]te d'Ivoire:Yamoussoukro\n")
    (tmp_path / "elements").write_text("Xx:999:1.0:Testium\nH:1:1.008:Hydrogen\n")
    facts, source = load_facts(tmp_path)
    assert "bsdgames" in source
    as_tuples = {(f.relation, f.subject, f.value) for f in facts}
    assert ("capital", "Cote d'Ivoire", "Yamoussoukro") in as_tuples
    assert ("atomic_number", "Testium", "999") in as_tuples
    assert ("capital", "France", "Paris") in as_tuples  # the built-in table is merged in
    assert len([f for f in facts if (f.relation, f.subject) == ("atomic_number", "Hydrogen")]) == 1
    facts, source = load_facts(tmp_path / "missing")
    assert source == "built-in fact table" and facts == list(BUILTIN_FACTS)


def test_quiz_files_are_found_under_a_text_root(tmp_path):
    """The speedrun unpacks bsdgames into a prefix (--text-root): its quiz files are used, so that a machine
    without bsdgames installed makes the same questions; without them there, the system's folder is read."""
    from src.corpus.quiz import QUIZ_DIR, quiz_dir_under
    quiz = tmp_path / "usr" / "share" / "games" / "bsdgames" / "quiz"
    quiz.mkdir(parents=True)
    (quiz / "africa").write_text("Kenya:Nairobi\n")
    assert quiz_dir_under(tmp_path) == quiz
    facts, source = load_facts(quiz_dir_under(tmp_path))
    assert str(quiz) in source and ("capital", "Kenya", "Nairobi") in {(f.relation, f.subject, f.value) for f in facts}
    assert quiz_dir_under(tmp_path / "elsewhere") == QUIZ_DIR == quiz_dir_under(None)


def test_arithmetic_answers_are_correct():
    rng = random.Random(0)
    symbols = {"plus": "+", "minus": "-", "times": "*", "divided by": "//"}
    for _ in range(300):
        qa = arithmetic_qa(rng)
        match = re.fullmatch(r"(.+) (plus|minus|times|divided by) (.+) is (.+)\.", qa.answer.lower())
        a, op, b, result = match.groups()
        value = eval(f"{words_to_number(a)} {symbols[op]} {words_to_number(b)}")
        assert value == words_to_number(result), qa
        assert words_to_number(a) % max(1, words_to_number(b)) == 0 or op != "divided by"


def test_unit_answers_are_correct():
    rng = random.Random(1)
    for _ in range(100):
        qa = units_qa(rng)
        match = re.fullmatch(r"There (?:are|is) (.+?) \w+ in (one|\w+(?: \w+)?) \w+\.", qa.answer)
        assert match, qa.answer
        assert words_to_number(match.group(1)) % words_to_number(match.group(2)) == 0


def test_generated_questions_normalise_and_answers_are_sentences():
    facts, _ = load_facts()
    rng = random.Random(2)
    for _ in range(500):
        qa = make_qa(facts, rng)
        assert is_normalised(transcript(qa.question)), qa
        assert qa.answer[0].isupper() and qa.answer.endswith("."), qa
        assert not re.search(r"\d", qa.answer), qa  # numbers spelled out for the LM


def test_apportion_sums_and_respects_minimum():
    assert sum(apportion(101, {"a": 0.3, "b": 0.45, "c": 0.25}).values()) == 101
    assert apportion(4, {"a": 0.9, "b": 0.05, "c": 0.05}, minimum=1) == {"a": 2, "b": 1, "c": 1}
    assert apportion(3, {"a": 1, "b": 0, "c": 1}, minimum=1)["b"] == 0


def plan(seed=1, **overrides):
    facts, _ = load_facts()
    options = dict(seed=seed, utterances=60, speakers=9, valid_fraction=0.2, test_fraction=0.2, augment=0.3)
    return plan_corpus(PlanOptions(**{**options, **overrides}), VOICES, facts)


def test_plan_is_deterministic_and_seed_dependent():
    assert plan(seed=5) == plan(seed=5)
    assert [u.text for u in plan(seed=5)] != [u.text for u in plan(seed=6)]


def test_plan_splits_are_speaker_and_voice_disjoint():
    """Every speaker and every voice is in one split; the held-out family (auto: flite, since other engines are
    used) only in test-engine; piper's single voice only in train."""
    utterances = plan()
    splits = ("train", "valid", "test", "test-engine")
    speakers = {split: {u.speaker for u in utterances if u.split == split} for split in splits}
    assert all(speakers.values())
    voices = {split: {(s.engine, s.voice) for s in members} for split, members in speakers.items()}
    ids = {split: {s.speaker_id for s in members} for split, members in speakers.items()}
    for a in splits:
        for b in splits:
            if a != b:
                assert not (ids[a] & ids[b]) and not (voices[a] & voices[b]), (a, b)
    assert {engine for engine, _ in voices["test-engine"]} == {"flite"}
    assert all(engine != "flite" for split in splits[:3] for engine, _ in voices[split])
    assert all(engine != "piper" for split in splits[1:] for engine, _ in voices[split])


@pytest.mark.parametrize("spec, engines", [("none", None), ("espeak:en-gb", {"espeak"}), ("piper", {"piper"})])
def test_heldout_family_choices(spec, engines):
    utterances = plan(heldout=spec)
    held = {u.speaker.engine for u in utterances if u.split == "test-engine"}
    assert held == (engines or set())
    if spec == "espeak:en-gb":
        assert all(u.speaker.voice.startswith("en-gb") == (u.split == "test-engine")
                   for u in utterances if u.speaker.engine == "espeak")


def test_bad_heldout_family_is_refused():
    with pytest.raises(ValueError, match="no espeak voice starts with 'xx'"):
        plan(heldout="espeak:xx")
    with pytest.raises(ValueError, match="not among the engines"):
        plan(heldout="festival")


def test_read_rows_come_from_the_text_pool():
    pool = {"mine": ["The lighthouse keeper climbed the stairs.", "Penguins huddle together in winter."],
            "other": ["A curious fox wandered through the allotments."]}
    facts, _ = load_facts()
    utterances = plan_corpus(PlanOptions(seed=1, utterances=60, speakers=9, valid_fraction=0.2, test_fraction=0.2),
                             VOICES, facts, pool)
    read = [u for u in utterances if u.kind == "read"]
    assert read and all(u.text in pool["mine"] + pool["other"] for u in read)
    assert all(u.utt_id.startswith("asr-") and u.response == u.transcript for u in read)


def test_multi_turn_context_is_earlier_questions_of_the_same_speaker():
    utterances = plan(multiturn=1.0, utterances=120)
    by_id = {u.utt_id: u for u in utterances}
    with_context = [u for u in utterances if u.context]
    assert with_context and {u.kind for u in with_context} <= {"qa", "incomplete", "ignore"}
    cut = 0
    for u in with_context:
        assert 1 <= len(u.context) <= 2
        for utt_id, said in u.context:
            earlier = by_id[utt_id]
            assert earlier.kind == "qa" and earlier.speaker == u.speaker and earlier.utt_id != u.utt_id
            assert earlier.response.startswith(said) and said
            cut += said != earlier.response
    assert cut  # some answers were interrupted
    assert [u.text for u in plan(multiturn=0.0, utterances=120)] == [u.text for u in utterances]


def test_plan_ids_follow_reference_conventions():
    utterances = plan()
    assert len({u.utt_id for u in utterances}) == len(utterances)
    for u in utterances:
        kind = KINDS[u.kind]
        assert u.utt_id.startswith("asr-") == (u.kind in ("asr", "read"))
        assert u.utt_id.endswith("-cut") == (u.kind == "incomplete")
        assert u.utt_id.endswith("-ignore") == (u.kind == "ignore")
        assert re.fullmatch(rf"(asr-)?{u.speaker.speaker_id}-{kind.chapter}-\d{{4}}{kind.suffix}", u.utt_id)
        assert is_normalised(u.transcript)
        if u.kind == "incomplete":
            assert u.response in INCOMPLETE_REPLIES and 0.3 <= u.cut_fraction <= 0.7
            assert len(u.transcript.split()) < len(transcript(u.text).split())
        if u.kind == "ignore":
            assert u.response in IGNORE_REPLIES and not u.text.endswith("?")
        if u.kind in ("asr", "read"):
            assert u.response == u.transcript and not u.answer
        if u.kind == "qa":
            assert u.answer and transcript(u.answer) in transcript(u.response)
    for split in ("train", "valid", "test", "test-engine"):
        assert {u.kind for u in utterances if u.split == split} == set(KINDS)


def test_plan_rejects_impossible_splits():
    with pytest.raises(ValueError, match="at least 4 speakers"):
        plan(speakers=3)
    with pytest.raises(ValueError, match="fractions"):
        plan(valid_fraction=0.5, test_fraction=0.5)


def test_hours_turn_into_a_proportional_utterance_count():
    from src.corpus.build import count_for_hours
    facts, _ = load_facts()
    options = PlanOptions(seed=3, utterances=10, speakers=9)
    small, large = (count_for_hours(h, options, VOICES, facts) for h in (0.1, 1.0))
    assert 90 < small < 250  # 360 s of 1.5-4 s utterances
    assert abs(large / small - 10) < 0.1


def test_words_before_cut():
    assert words_before_cut("what is the capital of france", 0.5) == "what is the"
    assert words_before_cut("hello world", 0.01) == "hello"


def tone(seconds, lead=0.2, tail=0.3, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    speech = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.concatenate([np.zeros(int(lead * rate), np.float32), speech, np.zeros(int(tail * rate), np.float32)])


def test_cut_speech_keeps_the_right_share_of_speech():
    audio = tone(2.0)
    start, end = speech_bounds(audio)
    assert abs(start - 3200) <= 2 and abs(end - (3200 + 32000)) <= 20
    cut = cut_speech(audio, 0.5)
    assert len(cut) == start + int(0.5 * (end - start))
    assert cut[-1] == 0.0  # faded out, no click


def test_set_peak():
    out = set_peak(tone(0.5), -6.0)
    assert np.isclose(np.abs(out).max(), 10 ** (-6 / 20), rtol=1e-5)


def test_noise_reaches_the_requested_snr():
    speech = tone(1.0, 0, 0)
    noisy = add_noise(speech, "pink", 10.0, np.random.default_rng(0))
    snr = 10 * np.log10(np.mean(speech ** 2) / np.mean((noisy - speech) ** 2))
    assert abs(snr - 10.0) < 0.01


def test_augmentation_off_and_noise_only_need_no_sox():
    speech = tone(0.5)
    assert draw_augmentation(random.Random(0), 0.0) == Augmentation()
    assert np.array_equal(apply_augmentation(speech, Augmentation(), 1), speech)
    noisy = apply_augmentation(speech, Augmentation(noise=("brown", 20.0)), 1)
    assert noisy.shape == speech.shape and not np.array_equal(noisy, speech)
    assert np.array_equal(noisy, apply_augmentation(speech, Augmentation(noise=("brown", 20.0)), 1))


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox not installed (bash scripts/install_tts.sh)")
def test_reverb_and_codecs_change_the_sound_but_keep_length_and_rate():
    t = np.arange(16000) / 16000
    chirp = (0.4 * np.sin(2 * np.pi * (300 + 3000 * t) * t)).astype(np.float32)  # 300 Hz .. 6.3 kHz sweep
    reverb = apply_augmentation(chirp, Augmentation(reverb=(60, 80)), 1)
    assert reverb.shape == chirp.shape and np.isfinite(reverb).all()
    assert np.abs(reverb - chirp).mean() > 0.01  # audibly different
    high = np.fft.rfftfreq(len(chirp), 1 / 16000) > 4200
    for codec in ("mulaw8k", "alaw8k", "gsm"):
        coded = apply_augmentation(chirp, Augmentation(codec=codec), 1)
        assert coded.shape == chirp.shape and coded.dtype == np.float32, codec
        kept = np.abs(np.fft.rfft(coded))[high].sum() / np.abs(np.fft.rfft(chirp))[high].sum()
        assert kept < 0.1, (codec, kept)  # 8 kHz telephone band: nothing left above 4 kHz


def test_conversation_slices():
    assert len(pad_to_slices(np.ones(100, np.float32), 3.0)) == 48000
    assert len(pad_to_slices(np.ones(48001, np.float32), 3.0)) == 96000
    assert expected_states(1, RESPONSE) == [RESPONSE]
    assert expected_states(3, IGNORE) == [INCOMPLETE, INCOMPLETE, IGNORE]


def test_split_at_pause_finds_the_word_gap():
    rate = 16000
    word = tone(0.4, 0, 0)
    audio = np.concatenate([np.zeros(1600, np.float32), word, np.zeros(2400, np.float32), word,
                            np.zeros(1600, np.float32)])
    gap_start, gap_end = 1600 + len(word), 1600 + len(word) + 2400
    assert gap_start <= split_at_pause(audio) < gap_end - rate // 50 + 1


def test_missing_engines_are_skipped_with_install_hints(monkeypatch, tmp_path):
    from src.corpus.__main__ import main
    from src.corpus.engines import find_engines
    monkeypatch.setenv("PATH", str(tmp_path))  # no flite, espeak-ng, text2wave or sox on it
    messages = []
    found = find_engines(["flite", "espeak", "festival"], log=messages.append)
    assert found == {}
    assert len(messages) == 3 and all("install: apt-get install" in m for m in messages)
    with pytest.raises(ValueError, match="unknown TTS engine"):
        find_engines(["mbrola"], log=messages.append)
    with pytest.raises(SystemExit, match="sox not found"):
        main(["--out", str(tmp_path / "corpus"), "--utterances", "3", "--speakers", "3"])


@pytest.mark.parametrize("args, message", [
    (["--hours", "-1"], "--hours must be a positive number"),
    (["--hours", "0"], "--hours must be a positive number"),
    (["--augment", "1.5"], r"--augment is a probability in \[0, 1\]"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--utterances", "2"], "at least 3"),
    (["--multiturn", "1.5"], r"--multiturn is a share in \[0, 1\]"),
    (["--time-budget", "0"], "--time-budget must be a positive number"),
])
def test_bad_sizes_are_refused_by_the_command_line(args, message, tmp_path, capsys):
    from src.corpus.__main__ import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "corpus"), *args])
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "corpus").exists()  # refused before anything is written


def test_output_path_that_is_a_file_or_cannot_be_created_is_refused(tmp_path):
    from src.corpus.__main__ import main
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    with pytest.raises(SystemExit, match=r"notes\.txt: --out is a file"):
        main(["--out", str(a_file), "--utterances", "3", "--speakers", "3"])
    with pytest.raises(SystemExit, match=r"notes\.txt/corpus: cannot create the output folder"):
        main(["--out", str(a_file / "corpus"), "--utterances", "3", "--speakers", "3"])


def test_rooms_speed_and_pitch():
    """A synthetic room keeps the length and the direct sound, speed resamples by its factor, draws are seeded."""
    from src.corpus.augment import change_speed, convolve_room, synthetic_rir
    rng = np.random.default_rng(0)
    speech = rng.standard_normal(16000).astype(np.float32)
    response = synthetic_rir(0.5, np.random.default_rng(1))
    assert len(response) == 8000 and response[0] == 1.0 and np.abs(response[1:]).max() <= 0.5
    tail = np.abs(response[-800:]).max() / np.abs(response[1:800]).max()
    assert tail < 10 ** (-40 / 20)  # decays by tens of dB over the RT60
    roomy = convolve_room(speech, response)
    assert len(roomy) == len(speech) and not np.allclose(roomy, speech)
    assert len(change_speed(speech, 1.1)) == pytest.approx(16000 / 1.1, abs=2)
    room = apply_augmentation(speech, Augmentation(rir=("synthetic", 0.3), speed=0.9), seed=4)
    assert len(room) == pytest.approx(16000 / 0.9, abs=2)
    assert np.array_equal(room, apply_augmentation(speech, Augmentation(rir=("synthetic", 0.3), speed=0.9), seed=4))
    draws = [draw_augmentation(random.Random(3), 1.0, ("a.wav", "b.wav")) for _ in range(2)]
    assert draws[0] == draws[1] and draws[0].speed and draws[0].pitch and (draws[0].rir or draws[0].reverb)


def test_recorded_rir_starts_at_its_peak(tmp_path):
    import soundfile as sf
    from src.corpus.augment import recorded_rir
    response = np.zeros(4410, np.float32)
    response[441], response[900] = 0.8, 0.2  # 10 ms pre-delay at 44.1 kHz
    sf.write(tmp_path / "room.wav", response, 44100)
    loaded = recorded_rir(tmp_path, "room.wav")
    assert abs(len(loaded) - (4410 - 441) * 16000 / 44100) < 3 and loaded[0] == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="--rir-dir"):
        apply_augmentation(np.ones(1600, np.float32), Augmentation(rir=("file", "room.wav")), seed=0)


def test_text_pools_are_cleaned_and_split(tmp_path):
    from src.corpus.pools import clean_sentence, pool_by_source, split_sentences
    assert split_sentences("Dr. Who came at 7. He left. Q. E. D. fine") == ["Dr. Who came at 7.", "He left.",
                                                                        "Q. E. D. fine"]
    assert clean_sentence("the museum holds 3,000 paintings") == "the museum holds 3,000 paintings."
    for bad in ("Q: what is this thing anyway?", "too short.", "x" * 5, "He said -- well, nothing at all here.",
                "Use <b>bold</b> tags in this sentence please."):
        assert clean_sentence(bad) is None, bad
    fortunes = tmp_path / "usr/share/games/fortunes"
    fortunes.mkdir(parents=True)
    (fortunes / "science").write_text("Gravity is a habit that is hard to shake off.\n\t\t-- Anonymous\n%\n"
                                      "   /\\_/\\\n  ( o.o )  <- ascii art, never spoken\n%\n")
    wordnet = tmp_path / "usr/share/wordnet"
    wordnet.mkdir(parents=True)
    (wordnet / "data.noun").write_text(
        "  1 this is the licence header\n"
        "00596081 04 n 01 plum 0 001 @ 00586262 n 0000 | a highly desirable position or assignment; "
        '"she got a political plum in the new cabinet"  \n'
        "00596193 04 n 01 praetorship 0 002 @ 00586262 n 0000 | the office of praetor in ancient rome  \n")
    extra = tmp_path / "mine.txt"
    extra.write_text("The ferry was cancelled because of strong winds. Penguins huddle together in winter.\n")
    pool = pool_by_source(tmp_path, [extra])
    pool = {name: pool[name] for name in ("fortunes", "wordnet", "mine.txt")}  # (+ installed wheels' sources)
    assert pool == {"fortunes": ["Gravity is a habit that is hard to shake off."],
                    "wordnet": ["Plum means a highly desirable position or assignment.",
                                "Praetorship means the office of praetor in ancient rome."],
                    "mine.txt": ["Penguins huddle together in winter.",
                                 "The ferry was cancelled because of strong winds."]}
    assert pool_by_source(None, [extra]).keys() == {"mine.txt"}


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (bash scripts/install_tts.sh)")
def test_kokoro_phonemes_use_its_symbol_set():
    """espeak-ng's IPA mapped to Kokoro's symbols (diphthongs as single letters, no tie bars), closed by the
    sentence's own punctuation; blend names cover every pair of the 5 vectors at 3 weights."""
    from src.corpus.engines import KokoroEngine
    engine = KokoroEngine()
    question = engine.phonemes("What is the capital of France?")
    assert question.endswith("?") and "\u0361" not in question and "r" not in question and "ɹ" in question
    assert "I" in engine.phonemes("I like my bike.")  # aɪ -> I
    assert engine.phonemes("Go home.").endswith(".") and "O" in engine.phonemes("Go home.")  # oʊ -> O
    voices = engine.voices()
    assert len(voices) == 5 + 10 * 3 and len(set(voices)) == len(voices)
    assert "jf_alpha+jm_kumo@0.3" in voices


def test_kokoro_speaks_deterministically_when_installed():
    from src.corpus.engines import KokoroEngine, Speaker
    engine = KokoroEngine()
    if engine.unavailable_reason() or shutil.which("sox") is None:
        pytest.skip(f"kokoro: {engine.unavailable_reason() or 'sox missing'} (install: {engine.install})")
    speaker = Speaker(1, "kokoro", "jf_alpha+jm_kumo@0.5", 1.0, 0.0)
    audio = engine.synthesize("What is two plus two?", speaker)
    assert 0.5 < len(audio) / 16000 < 5 and np.abs(audio).max() > 0.05
    assert np.array_equal(audio, engine.synthesize("What is two plus two?", speaker))
    other = engine.synthesize("What is two plus two?", Speaker(1, "kokoro", "jm_kumo", 1.0, 0.0))
    assert not np.array_equal(audio[:len(other)], other[:len(audio)])



def test_dectalk_speaks_deterministically_and_its_speakers_and_rates_differ():
    from src.corpus.engines import DectalkEngine, Speaker
    engine = DectalkEngine()
    if engine.unavailable_reason() or shutil.which("sox") is None:
        pytest.skip(f"dectalk: {engine.unavailable_reason() or 'sox missing'} (install: {engine.install})")
    text = "What is two plus two?"
    audio = engine.synthesize(text, Speaker(1, "dectalk", "paul", 1.0, 0.0))  # (N,) at 16 kHz
    assert 0.5 < len(audio) / 16000 < 5 and np.abs(audio).max() > 0.05
    assert np.array_equal(audio, engine.synthesize(text, Speaker(1, "dectalk", "paul", 1.0, 0.0)))
    faster = engine.synthesize(text, Speaker(1, "dectalk", "paul", 1.3, 0.0))
    assert len(faster) < 0.9 * len(audio)
    other = engine.synthesize(text, Speaker(1, "dectalk", "wendy", 1.0, 0.0))
    assert not np.array_equal(audio[:len(other)], other[:len(audio)])
    bracketed = engine.synthesize("[:np] Say [this] plainly.", Speaker(1, "dectalk", "kit", 1.0, 2.0))
    assert len(bracketed) / 16000 > 0.5  # brackets are DECtalk commands: dropped, the words still spoken

def test_heldout_kokoro_speaker_takes_its_blends_too():
    from src.corpus.engines import KokoroEngine
    voices = {**VOICES, "kokoro": KokoroEngine().voices()}
    facts, _ = load_facts()
    utterances = plan_corpus(PlanOptions(seed=1, utterances=80, speakers=14, valid_fraction=0.2, test_fraction=0.2,
                                         heldout="kokoro:jm_kumo"), voices, facts)
    held = {u.speaker.voice for u in utterances if u.split == "test-engine"}
    assert held and all("jm_kumo" in v for v in held)
    assert all("jm_kumo" not in u.speaker.voice for u in utterances if u.split != "test-engine")


class PickyEngine:
    """A fake engine (no sox needed at augment 0): a tone per text, but it cannot say texts with "capital"."""

    def synthesize(self, text, speaker):
        if "capital" in text:
            raise RuntimeError("picky: cannot say that")
        return (0.5 * np.sin(np.arange(8000 + 40 * len(text)) * 0.05)).astype(np.float32)


def test_failed_renders_are_recorded_left_out_and_not_retried(tmp_path):
    from src.corpus.build import FAILED_FILE, failed_ids, synthesise_all, without_failed
    from src.corpus.render import audio_path
    facts, _ = load_facts()
    utterances = plan_corpus(PlanOptions(seed=2, utterances=40, speakers=6, valid_fraction=0.2, test_fraction=0.2,
                                         heldout="none", multiturn=1.0), {"flite": ["slt", "rms", "awb"]}, facts)
    engines = {"flite": PickyEngine()}
    synthesise_all(utterances, engines, tmp_path, "flac", jobs=1)
    failed = failed_ids(tmp_path)
    assert failed == {u.utt_id for u in utterances if "capital" in u.text} and failed
    assert all((tmp_path / audio_path(u, "flac")).is_file() != (u.utt_id in failed) for u in utterances)
    kept = without_failed(utterances, failed)
    assert len(kept) == len(utterances) - len(failed)
    assert all(turn[0] not in failed for u in kept for turn in u.context)
    lines = (tmp_path / FAILED_FILE).read_text().splitlines()
    synthesise_all(utterances, engines, tmp_path, "flac", jobs=1)  # a resume does not try them again
    assert (tmp_path / FAILED_FILE).read_text().splitlines() == lines


def test_babble_is_other_voices_of_the_same_split_at_the_snr():
    utterances = plan(augment=1.0, utterances=120)
    babbled = [u for u in utterances if u.augmentation.noise and u.augmentation.noise[0] == "babble"]
    assert babbled
    split_of = {u.speaker: u.split for u in utterances}
    for u in babbled:
        assert len(u.augmentation.babble) == 3
        for speaker, text in u.augmentation.babble:
            assert split_of.get(speaker, u.split) == u.split and text and not text.endswith("?")
        if len({u2.speaker for u2 in utterances if u2.split == u.split}) > 1:
            assert all(speaker != u.speaker for speaker, _ in u.augmentation.babble)
    from src.corpus.engines import Speaker
    talker = Speaker(7, "flite", "rms", 1.0, 0.0)
    speech = np.sin(np.arange(16000) * 0.1).astype(np.float32)
    said = []

    def speak(text, speaker):
        said.append((text, speaker))
        return np.random.default_rng(len(text)).standard_normal(6000).astype(np.float32)

    augmentation = Augmentation(noise=("babble", 10.0), babble=((talker, "We ran out of milk."),
                                                               (talker, "It's your turn to cook.")))
    mixed = apply_augmentation(speech, augmentation, seed=0, speak=speak)
    noise = mixed - speech
    snr = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2))
    assert len(mixed) == len(speech) and abs(snr - 10.0) < 0.01
    assert [text for text, _ in said] == ["We ran out of milk.", "It's your turn to cook."]
    with pytest.raises(ValueError, match="babble noise needs"):
        apply_augmentation(speech, augmentation, seed=0)


def test_failures_are_summarised_by_engine_and_error(tmp_path):
    """The corpus log says why rows failed (one GPU corpus lost half its rows with no reason in the log)."""
    from src.corpus.build import failure_summary, synthesise_all
    facts, _ = load_facts()
    utterances = plan_corpus(PlanOptions(seed=2, utterances=40, speakers=6, heldout="none"),
                             {"flite": ["slt", "rms", "awb"]}, facts)
    synthesise_all(utterances, {"flite": PickyEngine()}, tmp_path, "flac", jobs=1)
    failed = sum("capital" in u.text for u in utterances)
    assert failure_summary(tmp_path) == [f"  {failed} failed, engine flite: error picky: cannot say that"]
    assert failure_summary(tmp_path / "nothing-failed-here") == []


def test_an_engine_that_cannot_say_a_test_sentence_is_skipped_with_its_error(monkeypatch):
    from src.corpus import engines as engine_module

    class BrokenEngine:
        name, install = "broken", "nothing to install"

        def voices(self):
            return ["only"]

        def unavailable_reason(self):
            return None

        def synthesize(self, text, speaker):
            raise RuntimeError("say failed (exit 1): cannot open dictionary")

    class SilentEngine(BrokenEngine):
        name = "silent"

        def synthesize(self, text, speaker):
            return np.zeros(0, np.float32)

    monkeypatch.setattr(engine_module, "ENGINE_CLASSES", (BrokenEngine, SilentEngine, PickyFound))
    monkeypatch.setattr(engine_module, "ENGINE_NAMES", ("broken", "silent", "picky"))
    said = []
    found = engine_module.find_engines(None, log=said.append, try_voice=True)
    assert list(found) == ["picky"]
    assert "skipping TTS engine broken: a test sentence failed (error: say failed (exit 1): cannot open " \
           "dictionary)" in said[0]
    assert "silent: a test sentence gave no audio" in said[1]
    assert list(engine_module.find_engines(None, log=said.append)) == ["broken", "silent", "picky"]  # no try


class PickyFound(PickyEngine):
    name, install = "picky", "nothing to install"

    def voices(self):
        return ["v"]

    def unavailable_reason(self):
        return None


def test_a_codec_sox_cannot_run_is_left_out_of_the_plan_and_only_the_codec_rows_change(monkeypatch):
    from src.corpus import augment
    facts, _ = load_facts()
    base = PlanOptions(seed=5, utterances=200, speakers=8, augment=0.5, heldout="none")
    everything = plan_corpus(base, VOICES, facts)
    without_gsm = plan_corpus(dataclasses.replace(base, codecs=("alaw8k", "mulaw8k")), VOICES, facts)
    assert {u.augmentation.codec for u in everything} >= {"gsm"}
    assert "gsm" not in {u.augmentation.codec for u in without_gsm}
    assert [u.augmentation.codec is None for u in everything] == [u.augmentation.codec is None for u in without_gsm]
    assert {u.augmentation.codec for u in plan_corpus(dataclasses.replace(base, codecs=()), VOICES, facts)} == {None}
    assert [dataclasses.replace(u, augmentation=dataclasses.replace(u.augmentation, codec=None))
            for u in everything] == \
           [dataclasses.replace(u, augmentation=dataclasses.replace(u.augmentation, codec=None))
            for u in without_gsm]
    if shutil.which("sox") is None:
        return
    monkeypatch.setitem(augment.CODECS, "nothing", ("-t", "no-such-format"))
    said = []
    assert augment.working_codecs(log=said.append) == ("alaw8k", "gsm", "mulaw8k")
    assert len(said) == 1 and said[0].startswith("augmentation codec nothing left out of the plan")


def test_a_failing_dectalk_say_is_reported_with_its_exit_status_and_stderr(tmp_path, monkeypatch):
    """On a lent GPU machine every DECtalk row failed and the reason was lost: the error keeps what say wrote."""
    from src.corpus import engines as engine_module
    say = tmp_path / "say"
    say.write_text("#!/bin/sh\necho 'cannot open dtalk_us.dic' >&2\nexit 2\n")
    monkeypatch.setattr(engine_module.DectalkEngine, "_folder", staticmethod(lambda: tmp_path))
    speaker = engine_module.Speaker(0, "dectalk", "paul", 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"exit 2\) for 'Hello there.': cannot open dtalk_us.dic"):
        engine_module.DectalkEngine().synthesize("Hello there.", speaker)
