// CUDA's built-in vector types (vector_types.h) for the emulator: same members, sizes and alignments
// as on the device, so code that reinterprets memory as int4/float4 behaves as it would there.
#pragma once
#include <cstdint>

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define QK_EMU_VEC1(T, name, align) \
  struct alignas(align) name {      \
    T x;                            \
  };                                \
  inline name make_##name(T x) { return name{x}; }
#define QK_EMU_VEC2(T, name, align) \
  struct alignas(align) name {      \
    T x, y;                         \
  };                                \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define QK_EMU_VEC3(T, name) \
  struct name {              \
    T x, y, z;               \
  };                         \
  inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define QK_EMU_VEC4(T, name, align) \
  struct alignas(align) name {      \
    T x, y, z, w;                   \
  };                                \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }

QK_EMU_VEC1(signed char, char1, 1)
QK_EMU_VEC2(signed char, char2, 2)
QK_EMU_VEC3(signed char, char3)
QK_EMU_VEC4(signed char, char4, 4)
QK_EMU_VEC1(unsigned char, uchar1, 1)
QK_EMU_VEC2(unsigned char, uchar2, 2)
QK_EMU_VEC3(unsigned char, uchar3)
QK_EMU_VEC4(unsigned char, uchar4, 4)
QK_EMU_VEC1(short, short1, 2)
QK_EMU_VEC2(short, short2, 4)
QK_EMU_VEC3(short, short3)
QK_EMU_VEC4(short, short4, 8)
QK_EMU_VEC1(unsigned short, ushort1, 2)
QK_EMU_VEC2(unsigned short, ushort2, 4)
QK_EMU_VEC3(unsigned short, ushort3)
QK_EMU_VEC4(unsigned short, ushort4, 8)
QK_EMU_VEC1(int, int1, 4)
QK_EMU_VEC2(int, int2, 8)
QK_EMU_VEC3(int, int3)
QK_EMU_VEC4(int, int4, 16)
QK_EMU_VEC1(unsigned int, uint1, 4)
QK_EMU_VEC2(unsigned int, uint2, 8)
QK_EMU_VEC4(unsigned int, uint4, 16)
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
QK_EMU_VEC1(long long, longlong1, 8)
QK_EMU_VEC2(long long, longlong2, 16)
QK_EMU_VEC1(unsigned long long, ulonglong1, 8)
QK_EMU_VEC2(unsigned long long, ulonglong2, 16)
QK_EMU_VEC1(float, float1, 4)
QK_EMU_VEC2(float, float2, 8)
QK_EMU_VEC3(float, float3)
QK_EMU_VEC4(float, float4, 16)
QK_EMU_VEC1(double, double1, 8)
QK_EMU_VEC2(double, double2, 16)

#undef QK_EMU_VEC1
#undef QK_EMU_VEC2
#undef QK_EMU_VEC3
#undef QK_EMU_VEC4

static_assert(sizeof(char4) == 4 && alignof(char4) == 4, "char4 layout");
static_assert(sizeof(int4) == 16 && alignof(int4) == 16, "int4 layout");
static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "float4 layout");
static_assert(sizeof(float2) == 8 && alignof(float2) == 8, "float2 layout");
static_assert(sizeof(short4) == 8 && alignof(short4) == 8, "short4 layout");
