"""Reading and writing audio files: libsndfile (WAV, FLAC, OGG, MP3) first, PyAV as fallback.

torchaudio 2.9+ hands file I/O to torchcodec, which the trainer image does not ship, so decoding
goes through soundfile and PyAV directly. Every decode is counted (:func:`decode_count`) so
tests and logs can show that a cached run never touched audio.

:func:`inspect_audio` decodes a file once and returns its samples with :class:`AudioFacts`:
the length measured by decoding next to the length its header claims, so a cut-off download
(a 5 kB fragment of a 45 s MP3 still *announces* 45 s) is recognised as truncated.
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


#: A file whose decoded length is under this share of the length its header announces is truncated.
TRUNCATION_RATIO = 0.9


@dataclass(frozen=True)
class AudioFacts:
    """What one full decode of a file established, next to what its header claims.

    ``frames``/``duration`` are measured by decoding; ``header_duration``, ``bitrate_kbps`` and
    ``codec`` (``"mp3"``, ``"pcm_s16le"``, ``"flac"``...) come from the container header and
    are ``None`` where it does not say. ``stream_error`` is the decoder's complaint when it
    stopped early on corrupt or cut-off data (the samples decoded before are kept).
    """

    sample_rate: int
    channels: int
    frames: int
    duration: float
    header_duration: float | None
    bitrate_kbps: float | None
    codec: str | None
    stream_error: str | None = None

    @property
    def truncated(self) -> bool:
        """The decode ended early: under :data:`TRUNCATION_RATIO` of the header's length, or the
        decoder reported a corrupt or cut-off stream."""
        if self.stream_error is not None:
            return True
        return bool(self.header_duration) and self.duration < TRUNCATION_RATIO * (self.header_duration or 0.0)


def decode_count() -> int:
    """How many files this process decoded so far."""
    return _decode_calls


def _count_decode() -> None:
    global _decode_calls
    with _counter_lock:
        _decode_calls += 1


def probe_audio(path: Path) -> AudioInfo:
    """Sample rate, channels and length of an audio file *as its header states them* (PyAV
    decodes the file only when libsndfile cannot read it). A truncated file reports its full
    length here: use :func:`inspect_audio` where the length matters. Raises
    :class:`UnreadableAudioError`."""
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
            wav, rate, _ = _decode_with_av(path)
        except Exception as av_error:
            raise UnreadableAudioError(
                f"{path}: not a readable audio file (libsndfile: {sf_error}; ffmpeg: {av_error})"
            ) from av_error
        return AudioInfo(rate, int(wav.shape[0]), int(wav.shape[1]))


def _decode_with_soundfile(path: Path) -> tuple[npt.NDArray[np.float32], int]:
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), int(rate)


def _decode_with_av(path: Path) -> tuple[npt.NDArray[np.float32], int, str | None]:
    """Samples, rate and the decoder's complaint when the stream broke off after some audio
    (``None`` when it decoded to the end). Corrupt data before any audio raises."""
    import av

    stream_error: str | None = None
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise UnreadableAudioError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate or stream.rate or 0)
        channels = int(stream.codec_context.channels or 1)
        resampler = av.AudioResampler(format="fltp", layout=None, rate=None)
        chunks: list[npt.NDArray[np.float32]] = []
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().astype(np.float32, copy=False))
        except (av.error.InvalidDataError, av.error.EOFError) as exc:
            if not chunks:
                raise
            stream_error = f"{type(exc).__name__}: {exc}"
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().astype(np.float32, copy=False))
    if not chunks or rate <= 0:
        raise UnreadableAudioError(f"{path}: no decodable audio frames")
    wav = np.concatenate(chunks, axis=1)
    if wav.shape[0] != channels and wav.shape[0] == 1:
        wav = np.repeat(wav, channels, axis=0)
    return np.ascontiguousarray(wav), rate, stream_error


def _decode(path: Path) -> tuple[npt.NDArray[np.float32], int, str | None]:
    """libsndfile, else PyAV: samples ``[C, T]``, rate and PyAV's complaint about a stream that
    broke off (see :func:`_decode_with_av`). Raises :class:`UnreadableAudioError`."""
    if not path.is_file():
        raise UnreadableAudioError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise UnreadableAudioError(f"{path}: file is empty")
    stream_error: str | None = None
    try:
        wav, rate = _decode_with_soundfile(path)
    except Exception as sf_error:
        try:
            wav, rate, stream_error = _decode_with_av(path)
        except Exception as av_error:
            raise UnreadableAudioError(
                f"{path}: not a readable audio file (libsndfile: {sf_error}; ffmpeg: {av_error})"
            ) from av_error
        if stream_error is not None:
            stream_error = f"libsndfile: {sf_error}; ffmpeg: {stream_error}"
    if wav.size == 0:
        raise UnreadableAudioError(f"{path}: no audio frames")
    if not np.all(np.isfinite(wav)):
        raise UnreadableAudioError(f"{path}: decoded samples contain NaN or infinity")
    return wav, rate, stream_error


def decode_audio(path: Path) -> tuple[npt.NDArray[np.float32], int]:
    """Float32 samples shaped ``[channels, frames]`` and the sample rate.

    Raises :class:`UnreadableAudioError` with the file name and both decoders' complaints
    (also for a stream that breaks off part way: :func:`inspect_audio` reports those).
    """
    _count_decode()
    wav, rate, stream_error = _decode(path)
    if stream_error is not None:
        raise UnreadableAudioError(f"{path}: not a readable audio file ({stream_error})")
    return wav, rate


def _riff_duration(path: Path) -> float | None:
    """The length a WAV file's ``data`` chunk announces, or ``None`` (not RIFF/WAVE, no
    ``fmt``/``data`` chunk, or a streaming writer's unknown size). libsndfile and ffmpeg both
    shorten it to what the file holds, which would hide a cut-off WAV."""
    with path.open("rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        rate = block_align = 0
        while len(chunk := fh.read(8)) == 8:
            chunk_id, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if chunk_id == b"data":
                if not rate or not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size / block_align / rate
            if chunk_id == b"fmt ":
                body = fh.read(size + size % 2)
                if len(body) < 16:
                    return None
                rate = int.from_bytes(body[4:8], "little")
                block_align = int.from_bytes(body[12:14], "little")
            else:
                fh.seek(size + size % 2, 1)
    return None


def _header_facts(path: Path) -> tuple[float | None, float | None, str | None]:
    """Length (seconds), bitrate (kbit/s) and codec as the file's header states them, each
    ``None`` where neither libsndfile nor PyAV can tell. Reads headers only, decodes nothing."""
    header_duration: float | None = _riff_duration(path)
    try:
        import soundfile as sf

        info = sf.info(str(path))
        # libsndfile's "unknown length" is 2**63-1
        if header_duration is None and 0 < info.frames < 2**62 and info.samplerate > 0:
            header_duration = float(info.frames) / float(info.samplerate)
    except Exception:  # not a libsndfile format: PyAV below
        pass
    bitrate: float | None = None
    codec: str | None = None
    try:
        import av

        with av.open(str(path)) as container:
            if container.streams.audio:
                stream = container.streams.audio[0]
                codec = str(stream.codec_context.codec.canonical_name) or None
                bits = stream.codec_context.bit_rate or container.bit_rate
                bitrate = round(float(bits) / 1000.0, 3) if bits else None
                if header_duration is None:
                    if stream.duration and stream.time_base:
                        header_duration = float(stream.duration * stream.time_base)
                    elif container.duration:
                        header_duration = float(container.duration) / 1_000_000
    except Exception:  # an unreadable header leaves the facts unknown; decoding decides
        pass
    return header_duration, bitrate, codec


def inspect_audio(path: Path) -> tuple[AudioFacts, npt.NDArray[np.float32]]:
    """Decode ``path`` once: its :class:`AudioFacts` (length by decoding, header length,
    bitrate, codec) and float32 samples ``[channels, frames]``. A stream that breaks off part
    way is returned with what decoded and ``stream_error`` set; see :attr:`AudioFacts.truncated`.

    Raises :class:`UnreadableAudioError` when nothing decodes.
    """
    _count_decode()
    wav, rate, stream_error = _decode(path)
    header_duration, bitrate, codec = _header_facts(path)
    frames = int(wav.shape[1])
    facts = AudioFacts(
        sample_rate=rate,
        channels=int(wav.shape[0]),
        frames=frames,
        duration=frames / rate if rate else 0.0,
        header_duration=header_duration,
        bitrate_kbps=bitrate,
        codec=codec,
        stream_error=stream_error,
    )
    return facts, wav
