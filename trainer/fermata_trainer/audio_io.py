"""Reading and writing audio files: libsndfile (WAV, FLAC, OGG, MP3) first, PyAV as fallback.

torchaudio 2.9+ hands file I/O to torchcodec, which the trainer image does not ship, so decoding
goes through soundfile and PyAV directly. Every decode is counted (:func:`decode_count`) so
tests and logs can show that a cached run never touched audio.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fermata_trainer.errors import TrainerConfigError

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aiff"})

_counter_lock = threading.Lock()
_decode_calls = 0


class UnreadableAudioError(TrainerConfigError):
    """An audio file could not be opened or decoded."""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def decode_count() -> int:
    """How many files this process decoded so far."""
    return _decode_calls


def _count_decode() -> None:
    global _decode_calls
    with _counter_lock:
        _decode_calls += 1


def probe_audio(path: Path) -> AudioInfo:
    """Sample rate, channels and length of an audio file (decodes MP3 headers fully via PyAV
    only when libsndfile cannot read the file). Raises :class:`UnreadableAudioError`."""
    if not path.is_file():
        raise UnreadableAudioError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise UnreadableAudioError(f"{path}: file is empty")
    try:
        import soundfile as sf

        info = sf.info(str(path))
        if info.frames <= 0:
            raise UnreadableAudioError(f"{path}: no audio frames")
        return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames))
    except UnreadableAudioError:
        raise
    except Exception as sf_error:
        try:
            wav, rate = _decode_with_av(path)
        except Exception as av_error:
            raise UnreadableAudioError(
                f"{path}: not a readable audio file (libsndfile: {sf_error}; ffmpeg: {av_error})"
            ) from av_error
        return AudioInfo(rate, int(wav.shape[0]), int(wav.shape[1]))


def _decode_with_soundfile(path: Path) -> tuple[npt.NDArray[np.float32], int]:
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), int(rate)


def _decode_with_av(path: Path) -> tuple[npt.NDArray[np.float32], int]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise UnreadableAudioError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate or stream.rate or 0)
        channels = int(stream.codec_context.channels or 1)
        resampler = av.AudioResampler(format="fltp", layout=None, rate=None)
        chunks: list[npt.NDArray[np.float32]] = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().astype(np.float32, copy=False))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().astype(np.float32, copy=False))
    if not chunks or rate <= 0:
        raise UnreadableAudioError(f"{path}: no decodable audio frames")
    wav = np.concatenate(chunks, axis=1)
    if wav.shape[0] != channels and wav.shape[0] == 1:
        wav = np.repeat(wav, channels, axis=0)
    return np.ascontiguousarray(wav), rate


def decode_audio(path: Path) -> tuple[npt.NDArray[np.float32], int]:
    """Float32 samples shaped ``[channels, frames]`` and the sample rate.

    Raises :class:`UnreadableAudioError` with the file name and both decoders' complaints.
    """
    _count_decode()
    if not path.is_file():
        raise UnreadableAudioError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise UnreadableAudioError(f"{path}: file is empty")
    try:
        wav, rate = _decode_with_soundfile(path)
    except Exception as sf_error:
        try:
            wav, rate = _decode_with_av(path)
        except Exception as av_error:
            raise UnreadableAudioError(
                f"{path}: not a readable audio file (libsndfile: {sf_error}; ffmpeg: {av_error})"
            ) from av_error
    if wav.size == 0:
        raise UnreadableAudioError(f"{path}: no audio frames")
    if not np.all(np.isfinite(wav)):
        raise UnreadableAudioError(f"{path}: decoded samples contain NaN or infinity")
    return wav, rate
