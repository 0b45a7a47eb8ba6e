// Level meters: the RMS of a MediaStream, read with an AnalyserNode on every animation frame.

export class LevelMeter {
  constructor(context, stream, element) {
    this.analyser = context.createAnalyser();
    this.analyser.fftSize = 1024;
    this.source = context.createMediaStreamSource(stream);
    this.source.connect(this.analyser);
    this.samples = new Float32Array(this.analyser.fftSize);
    this.element = element;
    this.level = 0;
    this.running = true;
    const tick = () => {
      if (!this.running) return;
      this.analyser.getFloatTimeDomainData(this.samples);
      let sum = 0;
      for (const s of this.samples) sum += s * s;
      this.level = Math.sqrt(sum / this.samples.length);
      // Show level on a dB scale from -60 dBFS (empty) to 0 dBFS (full).
      const db = 20 * Math.log10(this.level + 1e-9);
      this.element.value = Math.max(0, Math.min(1, (db + 60) / 60));
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  }

  stop() {
    this.running = false;
    this.source.disconnect();
    this.element.value = 0;
  }
}
